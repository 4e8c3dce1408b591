//! The Lua scripts behind the transport, and how they are run.
//!
//! Every step that reads state and then writes on it runs as one script, so concurrent
//! consumers never see it half done: the per-lane order gate, dead-lettering (copy, `XACK` and
//! advancing the lane in one go), trimming (the bound and the `XTRIM` together). Every key a
//! script touches shares the topic's hash tag, so the scripts also run on Redis Cluster.

use crate::error::is_noscript;
use fred::clients::Client;
use fred::interfaces::{ClientLike, LuaInterface};
use fred::prelude::Options;
use fred::types::{ClusterHash, CustomCommand, Value};

/// Helpers shared by the scripts: stream id comparison and field lookup.
const PRELUDE: &str = r#"
local function parse_id(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  if not ms then return nil end
  return tonumber(ms), tonumber(seq)
end
-- a < b, for stream ids
local function idlt(a, b)
  -- Ids of one length with the dash at one place (every id `XADD *` makes in this era)
  -- compare as strings; no pattern matching on this path, which the gate and ack scripts
  -- take for every lane.
  if #a == #b then
    local da = string.find(a, '-', 1, true)
    if da and da == string.find(b, '-', 1, true) then return a < b end
  end
  local am, as = parse_id(a)
  local bm, bs = parse_id(b)
  if not am or not bm then return false end
  if am ~= bm then return am < bm end
  return as < bs
end
local function field(fields, name)
  for i = 1, #fields, 2 do
    if fields[i] == name then return fields[i + 1] end
  end
  return nil
end
-- The most fields a copy of an entry (a dead letter, a replay) takes over as they are. A
-- command's arguments go through Lua's C stack, which holds about 8,000 values (`unpack`
-- fails past that): an entry with more fields (a hand-written `XADD`) could never be copied,
-- and a consumer would fail on it at every step. Past this, only the transport's own fields
-- are copied, the first of each name.
local MAX_COPIED_FIELDS = 1000
local OWN_FIELDS = {id = true, type = true, v = true, key = true, lane = true, prev = true,
                    record = true, group = true, replayed = true, origin = true}
-- Appends to `f` the fields of `fields` whose name `keep` keeps, all of them while there are
-- at most MAX_COPIED_FIELDS such; returns how many of those it left out.
local function copy_fields(f, fields, keep)
  local kept = 0
  for i = 1, #fields, 2 do
    if keep(fields[i]) then kept = kept + 1 end
  end
  local all, seen, dropped = kept <= MAX_COPIED_FIELDS, {}, 0
  for i = 1, #fields, 2 do
    local name = fields[i]
    if keep(name) then
      if all or (OWN_FIELDS[name] and not seen[name]) then
        seen[name] = true
        f[#f + 1] = name
        f[#f + 1] = fields[i + 1]
      else
        dropped = dropped + 1
      end
    end
  end
  return dropped
end
-- Copies an entry to the dead-letter stream and acknowledges it (its lane moves on). An entry
-- with too many fields keeps the transport's own only, and `dead.dropped` says how many went.
local function deadletter(keys, group, me, id, fields, count, reason)
  local f = {'dead.entry', id, 'dead.group', group, 'dead.consumer', me,
             'dead.deliveries', tostring(count), 'dead.error', reason}
  local dropped = copy_fields(f, fields, function(name) return string.sub(name, 1, 5) ~= 'dead.' end)
  if dropped > 0 then
    f[#f + 1] = 'dead.dropped'
    f[#f + 1] = tostring(dropped)
  end
  redis.call('XADD', keys.dead, '*', unpack(f))
  redis.call('XACK', keys.stream, group, id)
  redis.call('HDEL', keys.errors, id)
end
-- Resets the idle time of entries this consumer keeps, so no one reclaims them. An entry
-- deleted from the stream leaves the pending list in the claim, which does not return it: its
-- recorded error (in `errors`) goes with it.
local function refresh(stream, errors, group, me, ids)
  for i = 1, #ids, 100 do
    local args = {stream, group, me, 0}
    for j = i, math.min(i + 99, #ids) do args[#args + 1] = ids[j] end
    args[#args + 1] = 'JUSTID'
    local kept = {}
    for _, id in ipairs(redis.call('XCLAIM', unpack(args))) do kept[id] = true end
    for j = i, math.min(i + 99, #ids) do
      if not kept[ids[j]] then redis.call('HDEL', errors, ids[j]) end
    end
  end
end
"#;

/// KEYS: stream, lanes. ARGV: per event `lane, id, type, version, key, record` (`lane` and
/// `key` empty when the event has none). Returns the new entry ids.
///
/// The lanes of the whole batch are read with one `HMGET` and written back with one `HSET`
/// (each lane's last entry), not once per event: with 100 events, 2 calls instead of 200.
/// Each `XADD` is written out per shape (in a lane, keyed, neither) rather than built as a
/// table and unpacked: a fifth less server time for a batch of 100.
const PUBLISH: &str = r#"
local argv = ARGV
local last, lanes = {}, {}
for b = 1, #argv, 6 do
  local lane = argv[b]
  if lane ~= '' and last[lane] == nil then
    last[lane] = false
    lanes[#lanes + 1] = lane
  end
end
if #lanes > 0 then
  local cur = redis.call('HMGET', KEYS[2], unpack(lanes))
  for i, lane in ipairs(lanes) do last[lane] = cur[i] or '' end
end
local out, n, stream = {}, 0, KEYS[1]
for b = 1, #argv, 6 do
  local lane, key = argv[b], argv[b + 4]
  local id
  if lane ~= '' then
    id = redis.call('XADD', stream, '*', 'id', argv[b + 1], 'type', argv[b + 2], 'v', argv[b + 3],
      'key', key, 'lane', lane, 'prev', last[lane], 'record', argv[b + 5])
    last[lane] = id
  elseif key ~= '' then
    id = redis.call('XADD', stream, '*', 'id', argv[b + 1], 'type', argv[b + 2], 'v', argv[b + 3],
      'key', key, 'record', argv[b + 5])
  else
    id = redis.call('XADD', stream, '*', 'id', argv[b + 1], 'type', argv[b + 2], 'v', argv[b + 3],
      'record', argv[b + 5])
  end
  n = n + 1
  out[n] = id
end
if #lanes > 0 then
  local set = {}
  for _, lane in ipairs(lanes) do
    set[#set + 1] = lane
    set[#set + 1] = last[lane]
  end
  redis.call('HSET', KEYS[2], unpack(set))
end
return out
"#;

/// The publish of one event in a lane: [`PUBLISH`] without its loops and tables. KEYS:
/// stream, lanes. ARGV: `lane, id, type, version, key, record` (an event in a lane has a key).
/// Returns the new entry id.
const PUBLISH_ONE: &str = r#"
local prev = redis.call('HGET', KEYS[2], ARGV[1]) or ''
local id = redis.call('XADD', KEYS[1], '*', 'id', ARGV[2], 'type', ARGV[3], 'v', ARGV[4],
  'key', ARGV[5], 'lane', ARGV[1], 'prev', prev, 'record', ARGV[6])
redis.call('HSET', KEYS[2], ARGV[1], id)
return id
"#;

/// One gate step. KEYS: stream, dead, errors. ARGV: group, consumer, min idle (ms),
/// claim count, claim cursor, max deliveries, ready limit, refresh held (`1` or `0`: restart
/// the idle time of the held entries that stay held; each is an `XCLAIM`, a write that is
/// replicated and logged, so the client asks for it only now and then, well inside the
/// redelivery delay, not at every poll), then per candidate the client read
/// (held, or just read) `id, kind, lane, prev, target`: kind `f` for an entry read by this
/// consumer just before the step (pending to it, delivered once), `h` for one it holds (its
/// owner and delivery count are looked up), `u` for one whose fields the client does not have
/// (read here, its lane, prev and target ignored); `lane`, `prev` and `target` (the `group`
/// field of a replay) empty for none.
///
/// Entry fields stay out of Lua (the client read them with a plain `XREADGROUP`), except for
/// entries reclaimed here (`XAUTOCLAIM`) or of kind `u`. Every candidate passes the gate in
/// stream order: an entry of a lane is ready once its predecessor in the lane is no longer
/// pending in this group (acknowledged, dead-lettered, or trimmed: the group read it before
/// this entry), or was handed out by this step before it (a chain in one batch).
///
/// "No longer pending" means "done with" only while entries leave the pending list in lane
/// order, so an entry is dead-lettered only once its predecessor is no longer pending: one
/// over its deliveries behind a predecessor handed out in this very step is held (its count
/// kept, so it is dead-lettered when its turn comes), not dead-lettered at once. A `prev` not
/// older than the entry that the stream does not hold (a lane's last entry in a stream deleted
/// since, under a clock now behind it) has nothing to wait for: the entry is ready. An entry
/// whose `prev` is no stream id (or not even text), or an entry not older than itself that the
/// stream holds, cannot be gated at all: it is dead-lettered as
/// malformed, but only once no older entry is pending in the group, its lane's among them (its
/// successors are gated on it, so it must not leave the pending list before those); until then
/// it is held like a waiting entry. An error of the gate's `XPENDING` other than an invalid id
/// fails the step.
/// Returns `{next cursor, {id, deliveries, fields or '', claimed, ...} ready, {id, fields or
/// '', ...} held, {id, ...} dead-lettered past max deliveries, {id, ...} dead-lettered as
/// malformed}`: fields only for the entries the script read
/// itself; claimed `1` for the entries this step reclaimed (the claim counted a delivery).
const STEP: &str = r#"
local keys = {stream = KEYS[1], dead = KEYS[2], errors = KEYS[3]}
local group, me = ARGV[1], ARGV[2]
local min_idle, claim_count, cursor = ARGV[3], tonumber(ARGV[4]), ARGV[5]
local max_del, limit = tonumber(ARGV[6]), tonumber(ARGV[7])
local refresh_held = ARGV[8] == '1'

-- Candidates, with their ids parsed once into numbers for sorting; `sorted` stays true while
-- they arrive in stream order (held entries then newer ones), and the sort is skipped then.
local cands, seen, sorted = {}, {}, true
local function add(c)
  if not seen[c.id] then
    seen[c.id] = true
    local ms, seq = parse_id(c.id)
    c.ms, c.seq = ms or 0, seq or 0
    local last = cands[#cands]
    if last and (c.ms < last.ms or (c.ms == last.ms and c.seq < last.seq)) then sorted = false end
    cands[#cands + 1] = c
  end
end
-- An empty field is none, as the client reads it: a replay of a dead letter written without
-- `dead.group` has `group` empty, meant for every group.
local function opt(s) if s == '' then return nil end return s end
local function from_fields(id, fields, count, fresh)
  return {id = id, fields = fields, count = count, fresh = fresh,
          lane = opt(field(fields, 'lane')), prev = field(fields, 'prev') or '',
          target = opt(field(fields, 'group'))}
end

local next_cursor = cursor
if claim_count > 0 then
  local r = redis.call('XAUTOCLAIM', keys.stream, group, me, min_idle, cursor, 'COUNT', claim_count)
  next_cursor = r[1]
  for _, e in ipairs(r[2]) do
    if type(e) == 'table' and e[1] then
      local c = from_fields(e[1], e[2], nil, true)
      c.claimed = true
      add(c)
    end
  end
  -- Pending entries deleted from the stream, which the claim dropped from the pending list:
  -- their recorded errors go with them.
  for _, id in ipairs(r[3] or {}) do redis.call('HDEL', keys.errors, id) end
end
for i = 9, #ARGV, 5 do
  local id, kind = ARGV[i], ARGV[i + 1]
  if not seen[id] then
    if kind == 'u' then
      local e = redis.call('XRANGE', keys.stream, id, id)
      if e[1] then
        add(from_fields(id, e[1][2], nil, false))
      else
        -- Deleted from the stream: nothing left to deliver.
        redis.call('XACK', keys.stream, group, id)
        redis.call('HDEL', keys.errors, id)
      end
    else
      local fresh = kind == 'f'
      add({id = id, count = fresh and 1 or nil, fresh = fresh, lane = opt(ARGV[i + 2]),
           prev = ARGV[i + 3], target = opt(ARGV[i + 4])})
    end
  end
end
if not sorted then
  table.sort(cands, function(a, b)
    if a.ms ~= b.ms then return a.ms < b.ms end
    return a.seq < b.seq
  end)
end

-- Entries handed out by this step: the next entry of a lane may follow its predecessor in one
-- batch (a chain, which the consumer handles in order).
local handed = {}
local ready, held, stale_refresh, dead, malformed = {}, {}, {}, {}, {}
-- The candidate's fields, read here when the client has them and the script does not.
local function fields_of(c)
  if c.fields then return c.fields end
  local e = redis.call('XRANGE', keys.stream, c.id, c.id)
  return e[1] and e[1][2]
end
for _, c in ipairs(cands) do
  local count = c.count
  if not count then
    local p = redis.call('XPENDING', keys.stream, group, c.id, c.id, 1)
    if p[1] and p[1][2] == me then count = tonumber(p[1][4]) end
  end
  if count then
    if c.target and c.target ~= group then
      -- A replay meant for another group.
      redis.call('XACK', keys.stream, group, c.id)
    else
      local prev = c.lane and c.prev or ''
      local state = 'ready'
      if prev ~= '' and handed[prev] then
        state = 'chained'
      elseif prev ~= '' then
        -- The predecessor was delivered to the group before this entry (groups read in stream
        -- order), so it is done with exactly when it is no longer pending: wait while it is.
        -- `pcall`: a `prev` Redis refuses as an id must not fail the step for every entry;
        -- any other error (the group deleted meanwhile, say) fails the step as usual. A
        -- `prev` not older than the entry itself (its own id, or a later one's) is malformed
        -- too: waiting for it could wait for ever (for itself, or for an entry waiting for it).
        -- Unless the stream holds no such entry: then it is the last entry of the lane in a
        -- stream deleted since (the lanes hash outlived it), under a server clock now behind
        -- it, and there is nothing to wait for: the entry starts its lane again.
        local p = false
        if parse_id(prev) then
          if idlt(prev, c.id) then
            p = redis.pcall('XPENDING', keys.stream, group, prev, prev, 1)
          else
            local e = redis.pcall('XRANGE', keys.stream, prev, prev)
            if not e.err and not e[1] then p = {} end
          end
        end
        if not p then
          state = 'malformed'
        elseif p.err then
          if not string.find(p.err, 'Invalid stream ID', 1, true) then return p end
          state = 'malformed'
        elseif p[1] then
          state = 'wait'
        end
      end
      if state == 'malformed'
         and redis.call('XPENDING', keys.stream, group, '-', '(' .. c.id, 1)[1] then
        -- Its successors are gated on it: it leaves the pending list only after every entry
        -- before it did (its lane's among them, wherever they are), so they wait for those.
        state = 'wait'
      end
      local over = count > max_del
      if state == 'malformed' then
        -- Its place in the lane is unknown: handing it out could break the order anywhere.
        local fields = fields_of(c)
        if fields then
          -- Bytes other than printable ASCII escaped, so the reason stays readable text.
          local shown = string.gsub(prev, '[^\32-\126]', function(ch)
            return string.format('\\x%02x', string.byte(ch))
          end)
          deadletter(keys, group, me, c.id, fields, count,
            'malformed entry: its `prev` field `' .. shown .. '` is not the id of an earlier entry')
          malformed[#malformed + 1] = c.id
        else
          redis.call('XACK', keys.stream, group, c.id)
          redis.call('HDEL', keys.errors, c.id)
        end
      elseif state == 'ready' and over then
        -- The times it was handed out: this reclaim's claim only found it over the limit.
        local handed_out = count - 1
        local reason = redis.call('HGET', keys.errors, c.id)
          or ('delivered ' .. handed_out .. ' times without an acknowledgement')
        local fields = fields_of(c)
        if fields then
          deadletter(keys, group, me, c.id, fields, handed_out, reason)
          dead[#dead + 1] = c.id
        else
          redis.call('XACK', keys.stream, group, c.id)
          redis.call('HDEL', keys.errors, c.id)
        end
      elseif state ~= 'wait' and not over and #ready < limit * 4 then
        handed[c.id] = true
        ready[#ready + 1] = c.id
        ready[#ready + 1] = count
        ready[#ready + 1] = c.fields or ''
        ready[#ready + 1] = c.claimed and 1 or 0
        if not c.fresh then stale_refresh[#stale_refresh + 1] = c.id end
      else
        -- Waiting; or over its deliveries behind a predecessor only handed out, not done
        -- (dead-lettering it now would release its successors from that predecessor: they
        -- would be gated on an entry no longer pending); or no room in the batch.
        held[#held + 1] = c.id
        held[#held + 1] = c.fields or ''
        if c.claimed and state == 'chained' and over then
          -- Keeps the count that puts it over: it is dead-lettered when its turn comes.
        elseif c.claimed then
          -- Reclaimed only to be held back: not handed out, so the claim takes back the
          -- delivery it counted (repeated takeovers of a held entry would otherwise use up
          -- its deliveries before it was ever handled).
          redis.call('XCLAIM', keys.stream, group, me, 0, c.id, 'RETRYCOUNT', math.max(count - 1, 0), 'JUSTID')
        elseif not c.fresh and refresh_held then
          stale_refresh[#stale_refresh + 1] = c.id
        end
      end
    end
  end
end
refresh(keys.stream, keys.errors, group, me, stale_refresh)
return {next_cursor, ready, held, dead, malformed}
"#;

/// KEYS: stream, errors. ARGV: group, consumer, id, error (may be empty). Restarts the
/// entry's idle clock if this consumer still owns it, so it comes back after the redelivery
/// delay, and records the error for the dead-letter stream. Returns the entry's delivery count
/// (left as it was), or -1 when this consumer does not own it.
const NACK: &str = r#"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if p[1] and p[1][2] == ARGV[2] then
  -- An entry deleted from the stream meanwhile leaves the pending list here (the claim does
  -- not return it): its error is not recorded, and one recorded before goes, or nothing
  -- would ever remove them.
  local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
  if not claimed[1] then
    redis.call('HDEL', KEYS[2], ARGV[3])
  elseif ARGV[4] ~= '' then
    redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
  end
  return tonumber(p[1][4])
end
return -1
"#;

/// KEYS: stream, errors. ARGV: group, consumer, ids. Hands back entries this consumer did not handle
/// (an earlier entry of their chain failed): their idle clock restarts, as with a nack, and
/// their delivery count goes back by one (`RETRYCOUNT`; `JUSTID` does not count the claim), so
/// this handing out was no attempt. Returns, per id, the delivery count it left, or -1 for an
/// entry this consumer does not own.
const DEFER: &str = r#"
local left = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  local count = -1
  if p[1] and p[1][2] == ARGV[2] then
    count = math.max(tonumber(p[1][4]) - 1, 0)
    local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i],
      'RETRYCOUNT', count, 'JUSTID')
    -- Deleted from the stream: gone from the pending list with the claim, its error too.
    if not claimed[1] then redis.call('HDEL', KEYS[2], ARGV[i]) end
  end
  left[#left + 1] = count
end
return left
"#;

/// KEYS: stream, dead, errors. ARGV: group, consumer, then pairs `id, reason`.
/// Dead-letters entries pending to this consumer: those it could not decode, or one its
/// handler gave up on (`Consumer::dead_letter`). One pending to another consumer (taken over)
/// is left alone; one no longer pending or in the stream is only cleared. Returns how many
/// were dead-lettered.
const DEAD_LETTER: &str = r#"
local keys = {stream = KEYS[1], dead = KEYS[2], errors = KEYS[3]}
local n = 0
for i = 3, #ARGV, 2 do
  local id, reason = ARGV[i], ARGV[i + 1]
  local e = redis.call('XRANGE', keys.stream, id, id)
  local p = redis.call('XPENDING', keys.stream, ARGV[1], id, id, 1)
  if p[1] and p[1][2] ~= ARGV[2] then
    -- Another consumer took it over: its attempt stands.
  elseif e[1] and p[1] then
    deadletter(keys, ARGV[1], ARGV[2], id, e[1][2], tonumber(p[1][4]), reason)
    n = n + 1
  else
    redis.call('XACK', keys.stream, ARGV[1], id)
    redis.call('HDEL', keys.errors, id)
  end
end
return n
"#;

/// KEYS: stream, errors. ARGV: group, consumer, idle (ms, or `released`), take back (`1` or `0`),
/// ids. Sets the idle time of the entries still pending to this consumer (others' are left
/// alone): `released`, to release entries it held but never handed out, so another consumer
/// reclaims them at once; 0, to keep entries it is still handling. A release sets their last
/// delivery to the epoch (`TIME 0`): idle longer than any consumer's claim waits for (those are
/// capped well below, see `consumer::MAX_CLAIM_IDLE`), whatever its redelivery delay; an
/// `IDLE` of the delay would not do for a delay longer than Redis's clock, which Redis takes
/// for bogus and turns into 0. With take back `1`, the delivery count also goes back by one:
/// for entries whose last read counted a delivery that never reached a handler (the next
/// consumer's claim counts it again); otherwise the count is unchanged. A release is
/// idempotent: an entry released already (idle since the epoch: more than half the time since
/// then) is left as it is, so a release sent again after its reply was lost does not take its
/// count back twice.
const SET_IDLE: &str = r#"
local when, at = 'IDLE', ARGV[3]
local released_before = -1
if at == 'released' then
  when, at = 'TIME', '0'
  released_before = tonumber(redis.call('TIME')[1]) * 500
end
local n = 0
for i = 5, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] and released_before >= 0 and tonumber(p[1][3]) > released_before then
    -- Released already: its count was taken back then.
    n = n + 1
  elseif p[1] and p[1][2] == ARGV[2] then
    local claimed
    if ARGV[4] == '1' then
      local count = math.max(tonumber(p[1][4]) - 1, 0)
      claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], when, at,
        'RETRYCOUNT', count, 'JUSTID')
    else
      claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], when, at, 'JUSTID')
    end
    -- Deleted from the stream: gone from the pending list with the claim, its error too.
    if not claimed[1] then redis.call('HDEL', KEYS[2], ARGV[i]) end
    n = n + 1
  end
end
return n
"#;

/// KEYS: stream. ARGV: `~` or `=`, the most entries to remove (with `~` only: Redis refuses a
/// `LIMIT` with `=`, and `~` without one stops at 100 stream nodes). Trims by `MINID` below
/// the oldest entry that some group still needs (pending, or not delivered yet). Returns
/// `{removed, bound}`; bound is empty when nothing could be trimmed.
const TRIM: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, ''} end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if #groups == 0 then return {0, ''} end
local bound = nil
for _, g in ipairs(groups) do
  local name, last, pending = field(g, 'name'), field(g, 'last-delivered-id'), tonumber(field(g, 'pending'))
  local need = last
  if pending > 0 then
    local s = redis.call('XPENDING', KEYS[1], name)
    if s[2] and idlt(s[2], need) then need = s[2] end
  end
  if not bound or idlt(need, bound) then bound = need end
end
if not bound or bound == '0-0' then return {0, ''} end
local removed
if ARGV[1] == '~' then
  removed = redis.call('XTRIM', KEYS[1], 'MINID', '~', bound, 'LIMIT', ARGV[2])
else
  removed = redis.call('XTRIM', KEYS[1], 'MINID', '=', bound)
end
return {removed, bound}
"#;

/// KEYS: stream, dead. ARGV: dead-letter ids. Publishes each dead letter's entry again, for its
/// group only, and deletes the dead letter. Returns `{{dead id, new id, ...}, {dead id, group,
/// ...}}`: first those found and published again, in that order, then those left as they are
/// because their group no longer exists on the stream (deleted, or renamed): published for it,
/// every other group would acknowledge the entry unhandled, and the event would be gone.
///
/// They are published in the order of their original entries (`dead.entry`; the dead letter's
/// own id breaks ties and stands in for a missing one), not the order of the arguments. The
/// entries of one lane (the `lane` field the entry had) meant for one group are chained to
/// each other like a publish chains a batch: the first keeps its lane with no `prev` (it is
/// ready as soon as it is read), each later one's `prev` is the one replayed before it, so the
/// gate hands it out only once that one is done with. The replays are not chained to the
/// lane's live entries (the lanes hash is left alone): they follow no published event, and
/// none waits for them. Entries in no lane stay in none.
const REPLAY: &str = r#"
local groups = {}
local info = redis.pcall('XINFO', 'GROUPS', KEYS[1])
if type(info) == 'table' and not info.err then
  for _, g in ipairs(info) do groups[field(g, 'name')] = true end
end
local found, seen = {}, {}
for i = 1, #ARGV do
  local dead = ARGV[i]
  if not seen[dead] then
    seen[dead] = true
    local e = redis.call('XRANGE', KEYS[2], dead, dead)
    if e[1] then
      local fields = e[1][2]
      local dms, dseq = parse_id(dead)
      -- The entry the event was first published as: kept through replays (`origin`), so an
      -- event dead-lettered again after a replay still sorts by where it first stood.
      local origin = field(fields, 'origin') or field(fields, 'dead.entry') or dead
      local ms, seq = parse_id(origin)
      if not ms then ms, seq = dms, dseq end
      found[#found + 1] = {dead = dead, fields = fields, origin = origin, ms = ms or 0,
                           seq = seq or 0, dms = dms or 0, dseq = dseq or 0}
    end
  end
end
table.sort(found, function(a, b)
  if a.ms ~= b.ms then return a.ms < b.ms end
  if a.seq ~= b.seq then return a.seq < b.seq end
  if a.dms ~= b.dms then return a.dms < b.dms end
  return a.dseq < b.dseq
end)
-- Per group and lane, the entry replayed last by this call.
local last = {}
local out, gone = {}, {}
for _, d in ipairs(found) do
  local fields = d.fields
  local group = field(fields, 'dead.group') or ''
  -- No group named: any group takes the entry.
  if group ~= '' and not groups[group] then
    gone[#gone + 1] = d.dead
    gone[#gone + 1] = group
  else
    local f = {}
    -- Bounded like a dead letter's copy (a dead letter written by hand may have any number).
    copy_fields(f, fields, function(name)
      return string.sub(name, 1, 5) ~= 'dead.' and name ~= 'lane' and name ~= 'prev'
        and name ~= 'group' and name ~= 'replayed' and name ~= 'origin'
    end)
    local lane = field(fields, 'lane')
    local chain = nil
    if lane and lane ~= '' then
      chain = group .. '\n' .. lane
      f[#f + 1] = 'lane'
      f[#f + 1] = lane
      f[#f + 1] = 'prev'
      f[#f + 1] = last[chain] or ''
    end
    f[#f + 1] = 'group'
    f[#f + 1] = group
    f[#f + 1] = 'replayed'
    f[#f + 1] = d.dead
    f[#f + 1] = 'origin'
    f[#f + 1] = d.origin
    local id = redis.call('XADD', KEYS[1], '*', unpack(f))
    if chain then last[chain] = id end
    redis.call('XDEL', KEYS[2], d.dead)
    out[#out + 1] = d.dead
    out[#out + 1] = id
  end
end
return {out, gone}
"#;

/// KEYS: stream. ARGV: group, minimum idle (ms). Deletes the group's consumers that hold no
/// pending entry and were idle that long. Returns their names.
const PRUNE: &str = r#"
local out = {}
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local name, pending, idle = field(c, 'name'), tonumber(field(c, 'pending')), tonumber(field(c, 'idle'))
  if pending == 0 and idle >= tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name)
    out[#out + 1] = name
  end
end
return out
"#;

/// KEYS: stream, delays. ARGV: group, consumer, its record (`<delay ms> <window ms> <token>`); an
/// empty consumer only looks. Joins the consumer to the group (so it is seen before its first
/// read), records its redelivery delay, and forgets the records of consumers gone from the
/// group. Returns `name, record` of every other consumer of the group idle for no longer than
/// its record's window: those still consuming.
const DELAYS: &str = r#"
local info = redis.pcall('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if type(info) ~= 'table' or info.err then return {} end
local idle = {}
for _, c in ipairs(info) do idle[field(c, 'name')] = tonumber(field(c, 'idle')) end
if ARGV[2] ~= '' and not idle[ARGV[2]] then
  redis.pcall('XGROUP', 'CREATECONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
local out = {}
local recorded = redis.call('HGETALL', KEYS[2])
for i = 1, #recorded, 2 do
  local name, record = recorded[i], recorded[i + 1]
  if not idle[name] then
    if name ~= ARGV[2] then redis.call('HDEL', KEYS[2], name) end
  elseif name ~= ARGV[2] then
    local window = tonumber(string.match(record, '^%d+ (%d+)'))
    if window and idle[name] <= window then
      out[#out + 1] = name
      out[#out + 1] = record
    end
  end
end
if ARGV[2] ~= '' then redis.call('HSET', KEYS[2], ARGV[2], ARGV[3]) end
return out
"#;

/// KEYS: delays. ARGV: consumer, its record. Deletes the consumer's record if it is still that
/// one, not a later consumer's of the same name.
const FORGET_DELAY: &str = r#"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"#;

/// A Lua script, run by `EVALSHA` with a fall back to `EVAL` (after a server restart, on a
/// cluster node that has not seen it).
#[derive(Debug)]
pub(crate) struct Script {
    source: String,
    sha: String,
}

impl Script {
    fn new(body: &str) -> Self {
        Self {
            source: format!("{PRELUDE}\n{body}"),
            sha: String::new(),
        }
    }

    /// A script that needs none of the prelude's helpers: on the publish path, where creating
    /// their closures at every call is a measurable part of a one-event publish.
    fn bare(body: &str) -> Self {
        Self {
            source: body.to_owned(),
            sha: String::new(),
        }
    }

    async fn load(&mut self, client: &Client) -> Result<(), fred::error::Error> {
        self.sha = client.script_load(self.source.as_str()).await?;
        Ok(())
    }

    /// `numkeys, keys.., args..`, and the slot of `keys[0]`.
    fn tail(keys: &[&str], args: Vec<Value>) -> (Vec<Value>, u16) {
        let slot = keys
            .first()
            .map(|k| fred::util::redis_keyslot(k.as_bytes()))
            .unwrap_or(0);
        let mut tail: Vec<Value> = Vec::with_capacity(keys.len() + args.len() + 1);
        tail.push(Value::from(keys.len() as i64));
        tail.extend(keys.iter().map(|k| Value::from(*k)));
        tail.extend(args);
        (tail, slot)
    }

    /// `EVAL` with the source, which also caches the script on the server.
    async fn eval(
        &self,
        client: &impl ClientLike,
        slot: u16,
        tail: Vec<Value>,
    ) -> Result<Value, fred::error::Error> {
        let mut with_source = Vec::with_capacity(tail.len() + 1);
        with_source.push(Value::from(self.source.as_str()));
        with_source.extend(tail);
        let eval = CustomCommand::new("EVAL", ClusterHash::Custom(slot), false);
        client.custom::<Value, Value>(eval, with_source).await
    }

    /// Runs the script on the node that owns `keys[0]`'s slot.
    pub(crate) async fn run(
        &self,
        client: &Client,
        options: &Options,
        keys: &[&str],
        args: Vec<Value>,
    ) -> Result<Value, fred::error::Error> {
        let (tail, slot) = Self::tail(keys, args);
        let client = client.with_options(options);
        let mut with_sha = Vec::with_capacity(tail.len() + 1);
        with_sha.push(Value::from(self.sha.as_str()));
        with_sha.extend(tail.iter().cloned());
        let evalsha = CustomCommand::new("EVALSHA", ClusterHash::Custom(slot), false);
        match client.custom::<Value, Value>(evalsha, with_sha).await {
            Err(e) if is_noscript(&e) => self.eval(&client, slot, tail).await,
            other => other,
        }
    }
}

/// Every script the transport runs.
#[derive(Debug)]
pub(crate) struct Scripts {
    pub(crate) publish: Script,
    pub(crate) publish_one: Script,
    pub(crate) step: Script,
    pub(crate) nack: Script,
    pub(crate) defer: Script,
    pub(crate) dead_letter: Script,
    pub(crate) set_idle: Script,
    pub(crate) trim: Script,
    pub(crate) replay: Script,
    pub(crate) prune: Script,
    pub(crate) delays: Script,
    pub(crate) forget_delay: Script,
}

impl Scripts {
    /// Loads every script (their SHA1 digests come from the server).
    pub(crate) async fn load(client: &Client) -> Result<Self, fred::error::Error> {
        let mut scripts = Self {
            publish: Script::bare(PUBLISH),
            publish_one: Script::bare(PUBLISH_ONE),
            step: Script::new(STEP),
            nack: Script::new(NACK),
            defer: Script::new(DEFER),
            dead_letter: Script::new(DEAD_LETTER),
            set_idle: Script::new(SET_IDLE),
            trim: Script::new(TRIM),
            replay: Script::new(REPLAY),
            prune: Script::new(PRUNE),
            delays: Script::new(DELAYS),
            forget_delay: Script::bare(FORGET_DELAY),
        };
        for script in [
            &mut scripts.publish,
            &mut scripts.publish_one,
            &mut scripts.step,
            &mut scripts.nack,
            &mut scripts.defer,
            &mut scripts.dead_letter,
            &mut scripts.set_idle,
            &mut scripts.trim,
            &mut scripts.replay,
            &mut scripts.prune,
            &mut scripts.delays,
            &mut scripts.forget_delay,
        ] {
            script.load(client).await?;
        }
        Ok(scripts)
    }
}
