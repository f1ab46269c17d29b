-- Deletes the named messages; returns how many were there. One script, so two replicas
-- acknowledging the same id at once count it once between them.
-- ARGV[4..]: message ids.
local removed = 0
for i = 4, #ARGV do removed = removed + remove(ARGV[i]) end
if removed > 0 then reschedule() end
return removed
