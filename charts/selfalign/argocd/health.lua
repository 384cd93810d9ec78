-- Argo CD health check for selfalign.dev/SelfAlignRun
-- (argocd-cm: resource.customizations.health.selfalign.dev_SelfAlignRun).
--
-- Healthy: the run Succeeded. Degraded: it Failed (the condition names round, stage and cause).
-- Suspended: spec.suspend took effect. Progressing: anything else, including a status that
-- predates the latest spec change (observedGeneration < generation): the operator has not
-- acted on it yet, so nothing the status says can be trusted for this generation.

local hs = {status = "Progressing", message = "Waiting for the operator to observe the run"}

local generation = obj.metadata and obj.metadata.generation or 0
local status = obj.status
if status == nil then
  return hs
end
if status.observedGeneration == nil or status.observedGeneration < generation then
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end

-- Conditions of the current generation, by type (a condition written for an older
-- generation says nothing about this one).
local current = {}
if status.conditions ~= nil then
  for _, condition in ipairs(status.conditions) do
    if condition.observedGeneration == nil or condition.observedGeneration >= generation then
      current[condition.type] = condition
    end
  end
end

local function holds(type_, phase)
  local condition = current[type_]
  if condition ~= nil then
    return condition.status == "True"
  end
  return status.phase == phase
end

local function describe(type_)
  local condition = current[type_]
  if condition ~= nil and condition.message ~= nil and condition.message ~= "" then
    return condition.message
  end
  if status.message ~= nil and status.message ~= "" then
    return status.message
  end
  return "phase " .. (status.phase or "unknown")
end

if holds("Failed", "Failed") then
  hs.status = "Degraded"
  hs.message = describe("Failed")
elseif holds("Suspended", "Suspended") then
  hs.status = "Suspended"
  hs.message = describe("Suspended")
elseif holds("Ready", "Succeeded") then
  hs.status = "Healthy"
  hs.message = describe("Ready")
else
  hs.message = describe("Progressing")
end
return hs
