-- The outbox relay's Postgres role, with the least privilege `relay cdc` needs (RUNBOOK.md, "The
-- relay's Postgres role"). Run it as an administrator, with psql, in the outbox's database:
--
--   RELAY_DB_PASSWORD='...' psql -v ON_ERROR_STOP=1 -d app -f deploy/postgres/relay-role.sql
--
-- compose.yaml runs it at the first start of its Postgres (docker-entrypoint-initdb.d).
--
--   LOGIN REPLICATION   open replication connections, create and stream its logical slot. No
--                       superuser, and not the owner of anything. (Its heartbeats use
--                       pg_logical_emit_message, which every role may call.)
--   SELECT on outbox    the polling relay and a lost-slot backfill read the table (the CDC
--                       relay itself streams it through the publication).
--   DELETE on outbox    only for the polling relay's janitor (poll.janitor = true), which is
--                       off by default: grant it by hand where the janitor runs.
--   the publication     created by the migrations (`relay migrate`, run by an administrator
--                       who owns the outbox table), not by the relay.

\getenv relay_password RELAY_DB_PASSWORD
\if :{?relay_password}
\else
  DO $$ BEGIN RAISE EXCEPTION 'set RELAY_DB_PASSWORD to the relay role''s password'; END $$;
\endif

CREATE ROLE relay LOGIN REPLICATION PASSWORD :'relay_password';
-- The outbox table exists once the migrations ran; grant on it if so, and on the tables this
-- administrator creates in public from now on (the migrations, when they run afterwards).
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO relay;
SELECT to_regclass('public.outbox') IS NOT NULL AS outbox_exists \gset
\if :outbox_exists
  GRANT SELECT ON public.outbox TO relay;
\endif
