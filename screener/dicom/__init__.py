"""DICOM networking: the listener (C-ECHO/C-STORE SCP), spool, TLS, echo, and the sender."""
