//! Splitting one backup into archives that dump and restore concurrently.
//!
//! One exported snapshot serves K + 1 `pg_dump` children: a schema archive (pre-data and
//! post-data, no large objects) and K data-only archives. The largest tables are spread over
//! the data archives by size; every other table, large objects and sequence values go to the
//! first one, selected by *excluding* the tables the others hold, so argv stays short however
//! many tables the database has. Restoring the schema's pre-data, then the data archives side
//! by side, then post-data (indexes and constraints) gives the database back.

use crate::pg::{PgClient, PgError};

/// At most this many tables are named on any `pg_dump` command line.
pub const MAX_NAMED_TABLES: usize = 64;

/// The schema archive's object name.
pub const SCHEMA_OBJECT: &str = "schema.dump.zst.age";

/// The object name of data archive `i` (0-based). The first keeps a one-archive backup's
/// name: it holds everything the others do not.
pub fn data_object(i: usize) -> String {
    match i {
        0 => crate::repo::DATA_OBJECT.to_string(),
        n => format!("data-{}.dump.zst.age", n + 1),
    }
}

/// A table with data to dump, as the snapshot's catalog shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub schema: String,
    pub name: String,
    /// `pg_table_size`: heap and TOAST, the bytes COPY has to read.
    pub bytes: u64,
}

/// What one `pg_dump` of a split backup dumps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Pre-data and post-data sections; large objects travel with the data.
    Schema,
    /// The data of these tables only.
    Tables(Vec<Table>),
    /// Every table's data except these, plus large objects and sequence values.
    AllExcept(Vec<Table>),
}

impl Part {
    pub fn pg_dump_args(&self) -> Vec<String> {
        match self {
            Part::Schema => vec![
                "--section=pre-data".into(),
                "--section=post-data".into(),
                "--no-blobs".into(),
            ],
            Part::Tables(tables) => std::iter::once("--data-only".to_string())
                .chain(tables.iter().map(|t| format!("--table={}", pattern(t))))
                .collect(),
            Part::AllExcept(tables) => std::iter::once("--data-only".to_string())
                .chain(
                    tables
                        .iter()
                        .map(|t| format!("--exclude-table={}", pattern(t))),
                )
                .collect(),
        }
    }
}

/// A `pg_dump` pattern matching exactly one table: double quotes make every character
/// literal (`*`, `?`, `.` and case included), and a double quote is written twice.
pub fn pattern(t: &Table) -> String {
    format!(
        "\"{}\".\"{}\"",
        t.schema.replace('"', "\"\""),
        t.name.replace('"', "\"\"")
    )
}

/// The data archives for `tables` (largest first or not) over `k` archives: archive 0 takes
/// everything not named; archives 1.. name their tables. Largest-first onto the least
/// loaded archive; after [`MAX_NAMED_TABLES`] tables the rest stay in archive 0, which is
/// then already the one with the smallest tables. Archives that get nothing are left out.
pub fn plan(tables: &[Table], k: usize) -> Vec<Part> {
    let k = k.max(1);
    let mut sorted: Vec<&Table> = tables.iter().collect();
    sorted.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.name.cmp(&b.name)));
    let mut load = vec![0u64; k];
    let mut named: Vec<Vec<Table>> = vec![Vec::new(); k];
    let mut named_count = 0;
    for t in sorted {
        let i = if named_count >= MAX_NAMED_TABLES {
            0
        } else {
            (0..k).min_by_key(|&i| (load[i], i)).expect("k >= 1")
        };
        load[i] += t.bytes;
        if i > 0 {
            named[i].push(t.clone());
            named_count += 1;
        }
    }
    let others: Vec<Table> = named[1..].iter().flatten().cloned().collect();
    std::iter::once(Part::AllExcept(others))
        .chain(
            named
                .into_iter()
                .skip(1)
                .filter(|t| !t.is_empty())
                .map(Part::Tables),
        )
        .collect()
}

/// Tables whose data `pg_dump` dumps by default (ordinary tables and partitions, not
/// extension members, temporary or foreign tables), with their sizes, largest first.
///
/// Sizes come from the catalog's statistics (`relpages`, kept current by VACUUM, ANALYZE and
/// autovacuum; a table never analyzed counts as empty), not `pg_table_size`: that takes each
/// table's ACCESS SHARE lock, so behind a session holding ACCESS EXCLUSIVE it would wait
/// forever, before pg_dump's own `--lock-wait-timeout` could apply.
pub async fn list_tables(client: &PgClient) -> Result<Vec<Table>, PgError> {
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text, \
                 (c.relpages::bigint + COALESCE(t.relpages, 0)::bigint) \
                 * current_setting('block_size')::bigint \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             LEFT JOIN pg_class t ON t.oid = c.reltoastrelid \
             WHERE c.relkind = 'r' AND c.relpersistence <> 't' \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%' \
               AND NOT EXISTS (SELECT 1 FROM pg_depend d \
                   WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e') \
             ORDER BY 3 DESC, 1, 2",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Table {
            schema: r.get(0),
            name: r.get(1),
            bytes: r.get::<_, i64>(2).max(0) as u64,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, bytes: u64) -> Table {
        Table {
            schema: "public".into(),
            name: name.into(),
            bytes,
        }
    }

    fn named(p: &Part) -> Vec<&str> {
        match p {
            Part::Tables(ts) | Part::AllExcept(ts) => ts.iter().map(|t| t.name.as_str()).collect(),
            Part::Schema => vec![],
        }
    }

    #[test]
    fn the_largest_tables_spread_and_the_rest_stay_in_the_first_archive() {
        let tables = [t("a", 100), t("b", 90), t("c", 50), t("d", 40), t("e", 1)];
        let parts = plan(&tables, 2);
        assert_eq!(parts.len(), 2);
        // a → 0, b → 1, c → 1 (90 < 100), d → 0, e → 1 (140 = 140, lower index wins: 0)
        assert_eq!(named(&parts[1]), vec!["b", "c"]);
        assert!(matches!(parts[0], Part::AllExcept(_)));
        assert_eq!(
            named(&parts[0]),
            vec!["b", "c"],
            "archive 0 excludes the others"
        );
    }

    #[test]
    fn one_archive_or_one_table_names_nothing() {
        let parts = plan(&[t("a", 10), t("b", 5)], 1);
        assert_eq!(parts, vec![Part::AllExcept(vec![])]);
        // A dominant table: it gets archive 0, the rest go to archive 1.
        let parts = plan(&[t("big", 1000), t("s1", 1), t("s2", 1)], 4);
        assert_eq!(named(&parts[0]).len(), 2);
        assert_eq!(parts.len(), 3);
    }

    #[test]
    fn argv_stays_bounded_with_many_tables() {
        let tables: Vec<Table> = (0..10_000)
            .map(|i| t(&format!("t{i}"), 10_000 - i))
            .collect();
        let parts = plan(&tables, 4);
        let total: usize = parts[1..].iter().map(|p| named(p).len()).sum();
        assert!(total <= MAX_NAMED_TABLES, "{total}");
        assert_eq!(named(&parts[0]).len(), total);
    }

    #[test]
    fn patterns_are_literal() {
        let odd = Table {
            schema: "S\"x".into(),
            name: "a.b*?".into(),
            bytes: 0,
        };
        assert_eq!(pattern(&odd), r#""S""x"."a.b*?""#);
        assert_eq!(
            Part::Tables(vec![odd.clone()]).pg_dump_args(),
            vec![
                "--data-only".to_string(),
                format!("--table={}", pattern(&odd))
            ]
        );
    }
}
