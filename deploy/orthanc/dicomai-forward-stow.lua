-- dicomai-forward-stow.lua: make dicomai-forward.lua send over DICOMweb STOW-RS.
--
-- Load it before dicomai-forward.lua ("LuaScripts" : [ "dicomai-forward-stow.lua",
-- "dicomai-forward.lua" ], as orthanc-stow-to-dicomai.json does). It names the entry of
-- "DicomWeb" > "Servers" that is dicomai's STOW-RS receiver; dicomai-forward.lua then posts
-- each stable study's new instances to /dicom-web/servers/<name>/stow instead of storing them
-- over DIMSE. Everything else (what is sent, the marks, the loop prevention) is the same.

DICOMAI_FORWARD_STOW_SERVER = 'dicomai'
