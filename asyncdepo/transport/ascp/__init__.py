"""IBM Aspera ``ascp`` as a transport: argv and options (``runner``), one child session (``session``), its
console and FASP-manager output (``console``, ``faspmgr``), and the one mapping of exit and FASP codes to
:mod:`asyncdepo.errors` (``faspmgr.classify``)."""
