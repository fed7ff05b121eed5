"""DICOMweb (PS3.18) for dicomai: results sent over STOW-RS, studies received over STOW-RS.

Modules:

* :mod:`dicomai.dicomweb.auth`: HTTP credentials read from files (``auth = "none" | "basic" |
  "bearer"``), re-read when the file changes; the Authorization header a client sends and the
  check a server makes. Shared by both directions; never logs a secret.
* :mod:`dicomai.dicomweb.stow_client`: one STOW-RS request per job and destination through
  ``dicomweb-client``, and the PS3.18 Store Instances Response read per instance.
"""
