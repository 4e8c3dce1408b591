-- Idempotency keys. A row is written by the transaction that does the work and commits with
-- it: there is never a committed "in progress" row that a crash could strand. `status` and
-- `body` hold the response; `expires_at` is set from the application's clock.
CREATE TABLE "__SCHEMA__".idempotency (
    scope       text        NOT NULL,
    key         text        NOT NULL,
    fingerprint text        NOT NULL,
    status      integer,
    body        jsonb,
    expires_at  timestamptz NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, key)
);

CREATE INDEX idempotency_expires_at ON "__SCHEMA__".idempotency (expires_at);

-- Claims a key inside the caller's transaction. Outcomes:
--   'replay'   the key completed (same fingerprint) and has not expired: status and body;
--   'mismatch' the key is used, or being used right now, by a request with another
--              fingerprint;
--   'new'      the caller's transaction now holds the key (its row and its lock) until it
--              ends; a concurrent claim with the same fingerprint waits for it, then replays
--              (or claims, if this transaction rolled back).
-- p_key_lock and p_fingerprint_lock are advisory lock keys the application derives from
-- (schema, scope, key) and (schema, scope, key, fingerprint). Every claimer holds its
-- fingerprint lock shared; the owner of a key also holds the key lock. A claimer that finds
-- the key lock taken but can take its fingerprint lock exclusively knows the owner's
-- fingerprint differs, and fails at once instead of waiting.
CREATE FUNCTION "__SCHEMA__".idempotency_claim(
    p_scope            text,
    p_key              text,
    p_fingerprint      text,
    p_now              timestamptz,
    p_expires_at       timestamptz,
    p_key_lock         bigint,
    p_fingerprint_lock bigint,
    OUT outcome text,
    OUT status  integer,
    OUT body    jsonb
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    r record;
BEGIN
    SELECT i.fingerprint, i.status, i.body INTO r
      FROM "__SCHEMA__".idempotency i
     WHERE i.scope = p_scope AND i.key = p_key AND i.expires_at > p_now
       AND i.status IS NOT NULL;
    IF FOUND THEN
        IF r.fingerprint <> p_fingerprint THEN
            outcome := 'mismatch';
        ELSE
            outcome := 'replay';
            status := r.status;
            body := r.body;
        END IF;
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock_shared(p_fingerprint_lock);
    IF NOT pg_try_advisory_xact_lock(p_key_lock) THEN
        IF pg_try_advisory_xact_lock(p_fingerprint_lock) THEN
            outcome := 'mismatch';
            RETURN;
        END IF;
        -- The owner has our fingerprint: wait for its transaction to end.
        PERFORM pg_advisory_xact_lock(p_key_lock);
    END IF;
    -- We hold the key lock, so no other claim of the key is in flight and any row is
    -- committed; a new statement sees it.
    SELECT i.fingerprint, i.status, i.body INTO r
      FROM "__SCHEMA__".idempotency i
     WHERE i.scope = p_scope AND i.key = p_key AND i.expires_at > p_now
       AND i.status IS NOT NULL;
    IF FOUND THEN
        IF r.fingerprint <> p_fingerprint THEN
            outcome := 'mismatch';
        ELSE
            outcome := 'replay';
            status := r.status;
            body := r.body;
        END IF;
        RETURN;
    END IF;
    -- Absent, expired, or never completed: this transaction takes the key.
    INSERT INTO "__SCHEMA__".idempotency AS i (scope, key, fingerprint, expires_at)
    VALUES (p_scope, p_key, p_fingerprint, p_expires_at)
    ON CONFLICT (scope, key) DO UPDATE
       SET fingerprint = EXCLUDED.fingerprint, status = NULL, body = NULL,
           expires_at = EXCLUDED.expires_at, created_at = now();
    outcome := 'new';
END
$$;
