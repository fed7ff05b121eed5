-- dicomai-forward.lua: forward every stable study to dicomai, without ever sending dicomai's
-- own results back to it.
--
-- Loaded by orthanc.json ("LuaScripts"). Needs in orthanc.json:
--   * a "DicomModalities" entry named "dicomai" (its AET is dicomai's AE title, which is also
--     the calling AE title dicomai uses when it stores its results here);
--   * "UserMetadata" : { "ForwardedToDicomai" : 1024 }.
--
-- When a study has received no new instance for "StableAge" seconds, OnStableStudy sends to
-- dicomai, over one association, every instance of the study that
--   1. was not stored by dicomai (instance metadata RemoteAET ~= dicomai's AE title),
--   2. is not in one of dicomai's result series (SeriesDescription "AI RESULT...",
--      "AI OVERLAY...", "AI REGIONS...", "AI KEY IMAGES...", "AI NOT COMPLETED..."; a second
--      guard, e.g. for results imported
--      through the REST API, which have no RemoteAET), and
--   3. was not forwarded before (instance metadata ForwardedToDicomai is absent).
-- After a successful send each forwarded instance is marked ForwardedToDicomai. Results coming
-- back from dicomai make the study change (and become stable) again; by then every source
-- instance is marked and the results are excluded, so nothing is sent. Instances added to the
-- study later are forwarded on their own; dicomai analyses them as a new generation.
-- A failed send marks nothing and logs a warning; the study is forwarded again at its next
-- change, or by hand: POST /modalities/dicomai/store with the instance IDs.
-- With dicomai-forward-stow.lua loaded first, the send is a STOW-RS request to dicomai's
-- DICOMweb receiver (POST /dicom-web/servers/<name>/stow) instead of a C-STORE association.

local MODALITY = 'dicomai'                 -- name of the entry in "DicomModalities"
-- Over DICOMweb instead: the name of dicomai's entry in "DicomWeb" > "Servers", set by
-- dicomai-forward-stow.lua when it is loaded first; nil (DIMSE) otherwise.
local STOW_SERVER = DICOMAI_FORWARD_STOW_SERVER
local MARK = 'ForwardedToDicomai'          -- name declared in "UserMetadata"
local RESULT_SERIES = { 'AI RESULT', 'AI OVERLAY', 'AI REGIONS', 'AI KEY IMAGES',
                        'AI NOT COMPLETED' }

local function Trim(s)
   return (string.gsub(s or '', '^%s*(.-)%s*$', '%1'))
end

-- dicomai's AE title, from the "dicomai" entry of "DicomModalities" (object or array form).
local function DicomaiAet()
   local modalities = GetOrthancConfiguration()['DicomModalities'] or {}
   local entry = modalities[MODALITY]
   if entry == nil then
      error('dicomai-forward.lua: no DicomModalities entry named "' .. MODALITY .. '"')
   end
   return string.upper(Trim(entry['AET'] or entry[1]))
end

local function IsResultSeries(description)
   local d = string.upper(Trim(description))
   for _, prefix in ipairs(RESULT_SERIES) do
      if string.sub(d, 1, string.len(prefix)) == prefix then
         return true
      end
   end
   return false
end

function OnStableStudy(studyId, tags, metadata)
   local dicomai = DicomaiAet()
   local series = ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))
   local send = {}
   local fromDicomai = 0
   local already = 0
   for _, s in ipairs(series) do
      if IsResultSeries(s['MainDicomTags']['SeriesDescription']) then
         fromDicomai = fromDicomai + #s['Instances']
      else
         for _, instanceId in ipairs(s['Instances']) do
            local meta = ParseJson(RestApiGet('/instances/' .. instanceId .. '/metadata?expand'))
            if string.upper(Trim(meta['RemoteAET'])) == dicomai then
               fromDicomai = fromDicomai + 1
            elseif meta[MARK] ~= nil then
               already = already + 1
            else
               table.insert(send, instanceId)
            end
         end
      end
   end

   local summary = 'dicomai-forward: study ' .. studyId .. ': ' .. fromDicomai ..
      ' from dicomai (not sent), ' .. already .. ' forwarded before, '
   if #send == 0 then
      -- Nothing new, e.g. only dicomai's results arrived since the last forward.
      print(summary .. 'sent 0')
      return
   end

   local body = DumpJson({ Resources = send, Synchronous = true }, true)
   local target = '/modalities/' .. MODALITY .. '/store'
   if STOW_SERVER ~= nil then
      target = '/dicom-web/servers/' .. STOW_SERVER .. '/stow'
   end
   if RestApiPost(target, body) == nil then
      print(summary .. 'FAILED to send ' .. #send .. '; sent again at the next change')
      return
   end
   local now = os.date('!%Y%m%dT%H%M%SZ')
   for _, instanceId in ipairs(send) do
      RestApiPut('/instances/' .. instanceId .. '/metadata/' .. MARK, now)
   end
   print(summary .. 'sent ' .. #send)
end
