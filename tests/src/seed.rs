//! Seeding databases with varied content, and fingerprinting them for comparison.

use std::collections::BTreeMap;

use crate::pg::{quote_ident, PgCluster};

/// Rows in the seed's large table (`events`): enough that a dump spans many zstd frames
/// and age chunks.
pub const SEED_BIG_ROWS: u64 = 150_000;

/// The role that owns one seeded table; a globals dump must contain it.
pub const SEED_ROLE: &str = "dr_app_owner";

/// Fills `db` with tables covering the types a backup must carry intact: text with
/// quotes, newlines, backslashes and non-ASCII; bytea with every byte value; jsonb;
/// numeric with large precision; timestamptz; NULLs; a large object; a table in a
/// second schema; a table owned by the role [`SEED_ROLE`]; and a table of
/// [`SEED_BIG_ROWS`] rows. Deterministic, so two seeded databases hash alike.
pub fn seed(cluster: &PgCluster, db: &str) {
    let sql = format!(
        r#"
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{SEED_ROLE}') THEN
    CREATE ROLE {SEED_ROLE} NOLOGIN;
  END IF;
END $$;

CREATE TABLE customers (
  id          serial PRIMARY KEY,
  name        text NOT NULL,
  note        text,
  balance     numeric(20, 6) NOT NULL,
  created_at  timestamptz NOT NULL,
  profile     jsonb
);
INSERT INTO customers (name, note, balance, created_at, profile)
SELECT 'customer ' || i || ' ' || (ARRAY['Zoë', 'O''Brien', 'Łukasz', '山田', 'back\slash', 'tab	here'])[1 + i % 6],
       CASE WHEN i % 7 = 0 THEN NULL ELSE E'line one\nline two ' || i END,
       (i * 1234.567891)::numeric(20, 6) - 500000,
       timestamptz '2024-01-01 00:00:00+00' + i * interval '37 minutes 13.25 seconds',
       jsonb_build_object('tier', i % 5, 'tags', jsonb_build_array('a' || i, i % 3 = 0), 'nested', jsonb_build_object('x', i * 0.5))
FROM generate_series(1, 2000) AS i;

CREATE TABLE blobs (
  id       int PRIMARY KEY,
  payload  bytea NOT NULL
);
INSERT INTO blobs
SELECT i, decode(string_agg(lpad(to_hex((i * 31 + j) % 256), 2, '0'), '' ORDER BY j), 'hex')
FROM generate_series(1, 300) AS i, generate_series(0, 1023) AS j
GROUP BY i;
INSERT INTO blobs VALUES (0, '\x'::bytea);

CREATE TABLE documents (
  id       int PRIMARY KEY,
  title    text NOT NULL,
  content  oid NOT NULL
);
INSERT INTO documents
SELECT i, 'document ' || i,
       lo_from_bytea(424200 + i, convert_to(repeat('large object ' || i || ' ', 2000 * i), 'UTF8'))
FROM generate_series(1, 3) AS i;

CREATE TABLE events (
  id      bigint PRIMARY KEY,
  at      timestamptz NOT NULL,
  kind    text NOT NULL,
  amount  numeric NOT NULL,
  attrs   jsonb NOT NULL
);
INSERT INTO events
SELECT i,
       timestamptz '2020-02-29 12:00:00+00' + i * interval '1 second',
       (ARRAY['login', 'purchase', 'refund', 'logout'])[1 + i % 4],
       round((i % 1000) * 3.14159265358979::numeric, 10),
       jsonb_build_object('seq', i, 'even', i % 2 = 0)
FROM generate_series(1, {SEED_BIG_ROWS}) AS i;

CREATE SCHEMA audit;
CREATE TABLE audit.log (
  id     bigserial PRIMARY KEY,
  entry  text NOT NULL
);
INSERT INTO audit.log (entry) SELECT 'audit entry ' || i FROM generate_series(1, 500) AS i;

CREATE TABLE app_settings (
  key    text PRIMARY KEY,
  value  text
);
INSERT INTO app_settings VALUES ('mode', 'production'), ('empty', ''), ('null', NULL);
ALTER TABLE app_settings OWNER TO {SEED_ROLE};

ANALYZE;
"#
    );
    cluster.psql(db, &sql);
}

/// Adds a table `bulk` holding about `mib` MiB of incompressible bytes, so a backup's
/// stored object is big enough to span several upload parts.
pub fn seed_incompressible(cluster: &PgCluster, db: &str, mib: u32) {
    let rows = mib * 1024;
    cluster.psql(
        db,
        &format!(
            "CREATE TABLE bulk (id int PRIMARY KEY, payload bytea NOT NULL);
             INSERT INTO bulk
             SELECT i, decode(string_agg(md5(i || '-' || j || '-' || random()), '' ORDER BY j), 'hex')
             FROM generate_series(1, {rows}) AS i, generate_series(1, 64) AS j
             GROUP BY i;"
        ),
    );
}

/// A fingerprint of every user table in `db` (row count and an md5 over all rows in a
/// fixed order), plus the large objects (under the key `<large objects>`), so a restored
/// database can be compared with its source.
pub fn table_hashes(cluster: &PgCluster, db: &str) -> BTreeMap<String, String> {
    let tables = cluster.psql(
        db,
        "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables \
         WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1",
    );
    let mut hashes = BTreeMap::new();
    for table in tables.lines().filter(|t| !t.is_empty()) {
        let hash = cluster.psql(
            db,
            &format!(
                "SELECT count(*) || ':' || coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '-') \
                 FROM {table} AS t"
            ),
        );
        hashes.insert(table.to_string(), hash);
    }
    let large_objects = cluster.psql(
        db,
        "SELECT count(*) || ':' || coalesce(md5(string_agg(oid::text || '=' || md5(lo_get(oid)), '|' ORDER BY oid)), '-') \
         FROM pg_largeobject_metadata",
    );
    hashes.insert("<large objects>".to_string(), large_objects);
    hashes
}

/// Creates database `name` and seeds it with [`seed`].
pub fn create_seeded(cluster: &PgCluster, name: &str) {
    cluster.psql(
        "postgres",
        &format!("CREATE DATABASE {}", quote_ident(name)),
    );
    seed(cluster, name);
}
