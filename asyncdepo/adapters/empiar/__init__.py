"""EMPIAR: the deposition flow (``depositor``) and the deposition JSON's schema (``schema``)."""
