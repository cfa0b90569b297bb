-- Argo CD health check for kubetune.io/FineTuneJob.
-- Installed under `resource.customizations.health.kubetune.io_FineTuneJob` in argocd-cm
-- (docs/install.md). Reads the job's status conditions:
--   Degraded     Failed=True
--   Suspended    Suspended=True
--   Healthy      Succeeded=True, and ServingReady=True when spec.serving.enabled
--   Progressing  anything else (validating, queued, QuotaExceeded, training, serving starting,
--                or a status not yet written for the current generation)
local hs = {}

local function condition(conditions, wanted)
  for _, c in ipairs(conditions) do
    if c.type == wanted then
      return c
    end
  end
  return nil
end

local function is_true(c)
  return c ~= nil and c.status == "True"
end

local function describe(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  if c ~= nil and c.reason ~= nil and c.reason ~= "" then
    return c.reason
  end
  return fallback
end

local status = obj.status or {}
local conditions = status.conditions or {}
local generation = (obj.metadata or {}).generation

if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local failed = condition(conditions, "Failed")
if is_true(failed) then
  hs.status = "Degraded"
  hs.message = describe(failed, "The fine-tuning job failed")
  return hs
end

local suspended = condition(conditions, "Suspended")
if is_true(suspended) then
  hs.status = "Suspended"
  hs.message = describe(suspended, "The fine-tuning job is suspended")
  return hs
end

local succeeded = condition(conditions, "Succeeded")
if is_true(succeeded) then
  local serving = ((obj.spec or {}).serving or {}).enabled == true
  local ready = condition(conditions, "ServingReady")
  if serving and not is_true(ready) then
    hs.status = "Progressing"
    hs.message = describe(ready, "Training succeeded; waiting for the model server")
    return hs
  end
  hs.status = "Healthy"
  if serving and status.endpoint ~= nil then
    hs.message = "Serving at " .. status.endpoint
  else
    hs.message = describe(succeeded, "The fine-tuning job succeeded")
  end
  return hs
end

local running = condition(conditions, "Running")
local validated = condition(conditions, "Validated")
hs.status = "Progressing"
if is_true(running) then
  hs.message = describe(running, "Training")
elseif running ~= nil and running.reason ~= nil and running.reason ~= "" then
  hs.message = describe(running, "Waiting to start")
else
  hs.message = describe(validated, "Waiting for the operator")
end
return hs
