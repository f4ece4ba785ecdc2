//! End-to-end tests of split backups (`dump_jobs = K`): one snapshot, a schema archive and K
//! data archives, restored pre-data → data archives side by side → post-data.
//!
//! What they prove: round trips are exact, table by table and in schema, for K = 1, 2, 4 on
//! a database with many small tables, one dominant table, large objects, a partitioned
//! table, a foreign key whose tables land in different archives, several schemas and a
//! materialized view; streamed (new database), staged (existing empty database) and
//! `--force` (replacing a restored one) all work; from Garage too; a corrupted data archive
//! fails the restore and drops the database it created; the README's stock-tools commands
//! restore a split backup; a drill of a split backup reports the sections.

use std::fs;
use std::path::{Path, PathBuf};

use dr_tests::{
    create_seeded, encryption_toml, pg_bindir, table_hashes, write_config, BedBase, Dr, DrOutput,
    PgCluster, Storage,
};
use serde_json::Value;

const ENV: &str = "test";
const DB: &str = "app";

/// Extra shapes on top of the seed: 120 small tables, a partitioned table, a foreign key
/// between two tables sized so that they land in different archives, a materialized view
/// (populated and not) and a sequence in a second schema.
const SHAPES: &str = r#"
DO $$ BEGIN
  FOR i IN 1..120 LOOP
    EXECUTE format('CREATE TABLE small_%s (id int PRIMARY KEY, v text)', i);
    EXECUTE format('INSERT INTO small_%s SELECT g, md5(g::text) FROM generate_series(1, %s) g', i, i);
  END LOOP;
END $$;
CREATE TABLE fk_parent (id int PRIMARY KEY, pad text NOT NULL);
INSERT INTO fk_parent SELECT g, repeat(md5(g::text), 20) FROM generate_series(1, 12000) g;
CREATE TABLE fk_child (id int PRIMARY KEY, parent_id int NOT NULL REFERENCES fk_parent(id), pad text NOT NULL);
INSERT INTO fk_child SELECT g, 1 + g % 12000, repeat(md5(g::text), 18) FROM generate_series(1, 12000) g;
CREATE TABLE measurements (at date NOT NULL, v int NOT NULL) PARTITION BY RANGE (at);
CREATE TABLE measurements_2025 PARTITION OF measurements FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE measurements_2026 PARTITION OF measurements FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
INSERT INTO measurements SELECT date '2025-01-01' + (g % 700), g FROM generate_series(1, 20000) g;
CREATE INDEX ON measurements (v);
CREATE SCHEMA "Sales ""EU""";
CREATE TABLE "Sales ""EU"""."Orders.*" (id bigserial PRIMARY KEY, customer_id int REFERENCES customers(id), total numeric);
INSERT INTO "Sales ""EU"""."Orders.*" (customer_id, total) SELECT 1 + g % 2000, g * 1.5 FROM generate_series(1, 3000) g;
CREATE MATERIALIZED VIEW kinds AS SELECT kind, count(*) AS n FROM events GROUP BY kind;
CREATE MATERIALIZED VIEW never_filled AS SELECT 1 AS x WITH NO DATA;
ANALYZE;
"#;

struct Bed {
    base: BedBase,
}

impl Bed {
    fn new(base: BedBase) -> Bed {
        create_seeded(&base.cluster, DB);
        base.cluster.psql(DB, SHAPES);
        Bed { base }
    }

    fn cluster(&self) -> &PgCluster {
        &self.base.cluster
    }

    /// A config for `dump_jobs = k` (every size splits), written under `<dir>/k<k>/`.
    fn config(&self, k: u32, drill: bool) -> PathBuf {
        let dir = self
            .base
            .dir()
            .join(format!("k{k}{}", if drill { "d" } else { "" }));
        fs::create_dir_all(&dir).expect("config dir");
        let mut body =
            encryption_toml(&[&self.base.keys.recipient], Some(&self.base.keys.identity));
        body += &format!(
            "[[databases]]\nname = \"{DB}\"\nurl = \"{}\"\nrpo = \"26h\"\nrto = \"1h\"\ndump_jobs = {k}\nsplit_min_mib = 0\n",
            self.cluster().url(DB)
        );
        body += "  [[databases.schedules]]\n  class = \"daily\"\n  cron = \"0 3 * * *\"\n  keep = \"30d\"\n";
        if drill {
            body += "  [databases.drill]\n  target = \"ephemeral\"\n  checks = [\"SELECT count(*) > 0 FROM fk_child\"]\n";
        }
        write_config(&dir, &self.base.storage, &body)
    }

    fn dr(&self, config: &Path) -> Dr {
        self.base
            .dr(config)
            .env("PGPASSWORD", self.cluster().password())
            .env("TMPDIR", self.staging())
    }

    fn staging(&self) -> PathBuf {
        let dir = self.base.dir().join("staging");
        fs::create_dir_all(&dir).expect("staging dir");
        dir
    }

    fn backup(&self, config: &Path) -> String {
        self.dr(config)
            .args(["backup", "--database", DB])
            .run()
            .assert_one_backup_id()
    }

    fn manifest(&self, id: &str) -> Value {
        let key = format!("{ENV}/{DB}/backups/{id}/manifest.json");
        serde_json::from_slice(&self.base.repo().get(&key)).expect("manifest JSON")
    }

    fn restore_into(&self, config: &Path, db: &str, extra: &[&str]) -> DrOutput {
        self.dr(config)
            .args(["restore", "--database", DB, "--json", "--jobs", "2"])
            .args(["--target", &self.cluster().url(db)])
            .args(extra)
            .run()
    }

    fn assert_same_as_source(&self, db: &str) {
        assert_eq!(
            table_hashes(self.cluster(), DB),
            table_hashes(self.cluster(), db),
            "the data of {db} differs from the source"
        );
        assert_eq!(
            schema_of(self.cluster(), DB),
            schema_of(self.cluster(), db),
            "the schema of {db} differs from the source"
        );
        assert_eq!(
            self.cluster().psql(
                db,
                "SELECT ispopulated FROM pg_matviews ORDER BY matviewname"
            ),
            "t\nf",
            "kinds must be populated, never_filled not"
        );
    }

    fn database_exists(&self, db: &str) -> bool {
        self.cluster().psql(
            "postgres",
            &format!("SELECT count(*) FROM pg_database WHERE datname = '{db}'"),
        ) == "1"
    }
}

/// `pg_dump --schema-only` of `db`, without the lines that differ between any two dumps.
fn schema_of(cluster: &PgCluster, db: &str) -> String {
    let out = cluster
        .client_command("pg_dump")
        .args(["--schema-only", "--no-owner", "-d", db])
        .output()
        .expect("run pg_dump");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn summary(out: &DrOutput) -> Value {
    out.assert_success();
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("dr restore --json printed no JSON ({e}):\n{}", out.stdout))
}

fn archive_names(manifest: &Value) -> (Vec<String>, Vec<String>) {
    let of = |role: &str| -> Vec<String> {
        manifest["objects"]
            .as_array()
            .expect("objects")
            .iter()
            .filter(|o| o["role"] == role)
            .map(|o| o["name"].as_str().expect("name").to_string())
            .collect()
    };
    (of("schema"), of("data"))
}

/// Decodes every archive of backup `id` with `dr restore --output DIR` and returns the
/// tables each data archive holds (from `pg_restore --list`).
fn tables_per_archive(bed: &Bed, config: &Path, dir: &Path) -> Vec<(String, Vec<String>)> {
    bed.dr(config)
        .args(["restore", "--database", DB, "--output"])
        .arg(dir)
        .run()
        .assert_success();
    let mut out = Vec::new();
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("output dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in names.into_iter().filter(|n| n.starts_with("data")) {
        let list = std::process::Command::new(pg_bindir().join("pg_restore"))
            .arg("--list")
            .arg(dir.join(&name))
            .output()
            .expect("pg_restore --list");
        assert!(list.status.success());
        let tables = String::from_utf8_lossy(&list.stdout)
            .lines()
            .filter(|l| l.contains(" TABLE DATA "))
            .map(|l| l.split(" TABLE DATA ").nth(1).unwrap_or("").to_string())
            .collect();
        out.push((name, tables));
    }
    out
}

#[test]
fn split_backups_round_trip_for_one_two_and_four_archives() {
    let bed = Bed::new(BedBase::file("dr-split-e2e-"));
    for k in [1u32, 2, 4] {
        let config = bed.config(k, false);
        let id = bed.backup(&config);
        let m = bed.manifest(&id);
        let (schema, data) = archive_names(&m);
        if k == 1 {
            assert_eq!(m["format"], 1, "{m:#}");
            assert!(schema.is_empty(), "{m:#}");
            assert_eq!(data, vec!["data.dump.zst.age"]);
        } else {
            assert_eq!(m["format"], 2, "{m:#}");
            assert_eq!(schema, vec!["schema.dump.zst.age"]);
            assert_eq!(data.len(), k as usize, "{m:#}");
            let order: Vec<&str> = m["restore_order"]
                .as_array()
                .expect("restore_order")
                .iter()
                .map(|s| s["section"].as_str().unwrap())
                .collect();
            assert_eq!(order, vec!["pre-data", "data", "post-data"]);
            assert_eq!(
                m["restore_order"][1]["objects"].as_array().unwrap().len(),
                k as usize
            );
        }

        // Streamed into a new database.
        let db = format!("streamed_{k}");
        let s = summary(&bed.restore_into(&config, &db, &["--create"]));
        let mode = if k == 1 { "staged" } else { "split-streamed" };
        assert_eq!(s["mode"], mode, "{s:#}");
        if k > 1 {
            let sections = &s["seconds"]["sections"];
            assert!(sections["data"].as_f64().unwrap() > 0.0, "{s:#}");
        }
        bed.assert_same_as_source(&db);

        if k == 1 {
            continue;
        }
        // Staged into an existing empty database.
        let db = format!("staged_{k}");
        bed.cluster().create_db(&db);
        let s = summary(&bed.restore_into(&config, &db, &[]));
        assert_eq!(s["mode"], "split-staged", "{s:#}");
        bed.assert_same_as_source(&db);

        // --force over it, after the target drifted: what the backup defines is replaced.
        bed.cluster().psql(
            &db,
            "DELETE FROM fk_child WHERE id < 100; INSERT INTO small_1 VALUES (999, 'drift'); \
             SELECT lo_unlink(424201);",
        );
        let s = summary(&bed.restore_into(&config, &db, &["--force", "--yes"]));
        assert_eq!(s["mode"], "split-staged", "{s:#}");
        bed.assert_same_as_source(&db);
        assert!(
            fs::read_dir(bed.staging()).unwrap().next().is_none(),
            "staging files left behind"
        );
    }

    // The newest backup (K = 4): the foreign key's tables were dumped into different
    // archives (the split was real).
    let config = bed.config(4, false);
    let per_archive = tables_per_archive(&bed, &config, &bed.base.dir().join("decoded"));
    assert_eq!(per_archive.len(), 4, "{per_archive:?}");
    let holder = |t: &str| {
        per_archive
            .iter()
            .position(|(_, ts)| ts.iter().any(|x| x.starts_with(&format!("public {t} "))))
            .unwrap_or_else(|| panic!("{t} in no archive: {per_archive:?}"))
    };
    assert_ne!(holder("fk_parent"), holder("fk_child"), "{per_archive:?}");
    assert_ne!(holder("events"), holder("fk_parent"), "{per_archive:?}");
}

#[test]
fn split_backups_stream_from_garage_into_a_new_database() {
    let bed = Bed::new(BedBase::s3("dr-split-s3-", "split"));
    let config = bed.config(2, false);
    let id = bed.backup(&config);
    assert_eq!(bed.manifest(&id)["format"], 2);
    let s = summary(&bed.restore_into(&config, "from_s3", &["--create"]));
    assert_eq!(s["mode"], "split-streamed", "{s:#}");
    bed.assert_same_as_source("from_s3");
    bed.dr(&config)
        .args(["verify", "--database", DB, "--deep"])
        .run()
        .assert_success();
}

#[test]
fn a_corrupted_data_archive_fails_the_restore_and_drops_the_database_it_created() {
    let bed = Bed::new(BedBase::file("dr-split-corrupt-"));
    let config = bed.config(2, false);
    let id = bed.backup(&config);
    let Storage::File(root) = &bed.base.storage else {
        unreachable!()
    };
    let object = root.join(format!("{ENV}/{DB}/backups/{id}/data-2.dump.zst.age"));
    let mut bytes = fs::read(&object).expect("read data-2");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    fs::write(&object, bytes).expect("write data-2");

    let out = bed.restore_into(&config, "corrupt_target", &["--create"]);
    out.assert_failure_mentions(&["data-2.dump.zst.age"]);
    assert!(
        !bed.database_exists("corrupt_target"),
        "the database the failed restore created is still there:\n{}",
        out.stderr
    );
    let verify = bed
        .dr(&config)
        .args(["verify", "--database", DB, "--deep"])
        .run();
    assert!(!verify.status.success(), "{}", verify.both());
    assert!(
        verify.stdout.contains("data-2.dump.zst.age") && verify.stdout.contains("FAILED"),
        "verify does not name the damaged archive:\n{}",
        verify.both()
    );
}

/// The README's break-glass commands for a split backup: age, zstd and pg_restore only.
const STOCK_SPLIT_RESTORE: &str = r#"
set -euo pipefail
cd "$BACKUP_DIR"
for f in *.dump.zst.age; do age -d -i "$IDENTITY" "$f" | zstd -d > "$WORK/${f%.zst.age}"; done
cd "$WORK"
pg_restore --no-owner --exit-on-error --section=pre-data -d "$TARGET" schema.dump
for f in data*.dump; do pg_restore --no-owner --exit-on-error -d "$TARGET" "$f"; done
pg_restore --no-owner --exit-on-error --section=post-data -j 2 -d "$TARGET" schema.dump
"#;

#[test]
fn stock_tools_restore_a_split_backup() {
    let bed = Bed::new(BedBase::file("dr-split-stock-"));
    let config = bed.config(4, false);
    let id = bed.backup(&config);
    let Storage::File(root) = &bed.base.storage else {
        unreachable!()
    };
    let work = bed.base.dir().join("stock");
    fs::create_dir(&work).unwrap();
    bed.cluster().create_db("by_hand");
    let path = format!(
        "{}:{}",
        pg_bindir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = bed
        .cluster()
        .client_command_for(Path::new("bash"))
        .arg("-c")
        .arg(STOCK_SPLIT_RESTORE)
        .env("PATH", path)
        .env("BACKUP_DIR", root.join(format!("{ENV}/{DB}/backups/{id}")))
        .env("IDENTITY", &bed.base.keys.identity)
        .env("WORK", &work)
        .env("TARGET", "by_hand")
        .output()
        .expect("run the stock-tools restore");
    assert!(
        out.status.success(),
        "stock-tools restore failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    bed.assert_same_as_source("by_hand");
    let readme =
        fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).expect("README");
    for line in STOCK_SPLIT_RESTORE
        .lines()
        .filter(|l| l.starts_with("pg_restore") || l.starts_with("for f"))
    {
        assert!(
            readme.contains(line),
            "README's break-glass section lacks: {line}"
        );
    }
}

#[test]
fn a_drill_of_a_split_backup_streams_the_archives_and_reports_the_sections() {
    let bed = Bed::new(BedBase::file("dr-split-drill-"));
    let config = bed.config(2, true);
    bed.backup(&config);
    let out = bed.dr(&config).args(["drill", "--database", DB]).run();
    out.assert_success();
    assert!(
        out.stdout.contains("restore of the split backup: pre-data"),
        "{}",
        out.both()
    );
    assert!(
        out.stdout.contains("2 data archives side by side"),
        "{}",
        out.both()
    );
}
