"""EMPIAR: the engine adapter (``adapter``: entry, sessions over ascp or Globus, rights, submission), the
deposition API client and journaled state (``depositor``), and the deposition JSON's schema (``schema``)."""
