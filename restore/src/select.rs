//! Choosing which backup to restore: by id, the latest, or the newest before a time.

use jiff::{Span, Timestamp};

use dr_core::manifest::Manifest;

#[derive(Debug, Clone, PartialEq)]
pub enum Selector {
    Latest,
    Id(String),
    /// The newest backup whose snapshot was taken at or before this instant.
    Before(Timestamp),
}

#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error("database `{database}` has no backups in {place}; check --database and the config's environment")]
    NoBackups { database: String, place: String },
    #[error("no backup `{id}` of database `{database}`; nearest ids: {nearest}")]
    UnknownId {
        id: String,
        database: String,
        nearest: String,
    },
    #[error("no backup of database `{database}` was taken at or before {before}; the oldest is {oldest_id} from {oldest_at}")]
    NoneBefore {
        database: String,
        before: Timestamp,
        oldest_id: String,
        oldest_at: Timestamp,
    },
    #[error("`{0}` is not a time: use RFC 3339 (2026-11-22T03:00:00Z) or a relative form like `2h ago` or `3 days ago`")]
    BadTime(String),
}

/// Picks one backup from `backups` (one database's, oldest first).
/// `place` names the repository and environment in errors.
pub fn select<'a>(
    backups: &'a [Manifest],
    database: &str,
    selector: &Selector,
    place: &str,
) -> Result<&'a Manifest, SelectError> {
    let newest = backups.last().ok_or_else(|| SelectError::NoBackups {
        database: database.to_string(),
        place: place.to_string(),
    })?;
    match selector {
        Selector::Latest => Ok(newest),
        Selector::Id(id) => {
            backups
                .iter()
                .find(|m| m.id.as_str() == id)
                .ok_or_else(|| SelectError::UnknownId {
                    id: id.clone(),
                    database: database.to_string(),
                    nearest: nearest_ids(backups, id),
                })
        }
        Selector::Before(t) => backups
            .iter()
            .rev()
            .find(|m| m.started_at <= *t)
            .ok_or_else(|| SelectError::NoneBefore {
                database: database.to_string(),
                before: *t,
                oldest_id: backups[0].id.to_string(),
                oldest_at: backups[0].started_at,
            }),
    }
}

/// Up to five ids closest in time to `id` (ids start with their timestamp), else the newest.
fn nearest_ids(backups: &[Manifest], id: &str) -> String {
    let target = id
        .get(..16)
        .and_then(|t| jiff::civil::DateTime::strptime("%Y%m%dT%H%M%SZ", t).ok())
        .and_then(|dt| dt.to_zoned(jiff::tz::TimeZone::UTC).ok())
        .map(|z| z.timestamp());
    let mut ranked: Vec<&Manifest> = backups.iter().collect();
    match target {
        Some(t) => ranked.sort_by_key(|m| (m.started_at.as_second() - t.as_second()).abs()),
        None => ranked.reverse(),
    }
    ranked
        .iter()
        .take(5)
        .map(|m| m.id.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parses `2026-11-22T03:00:00Z`, `2026-11-22 03:00:00+01:00`, or `2h ago` relative to `now`.
pub fn parse_time(text: &str, now: Timestamp) -> Result<Timestamp, SelectError> {
    let t = text.trim();
    if let Some(rel) = t.strip_suffix("ago") {
        let span: Span = rel
            .trim()
            .parse()
            .map_err(|_| SelectError::BadTime(text.to_string()))?;
        return now
            .to_zoned(jiff::tz::TimeZone::UTC)
            .checked_sub(span)
            .map(|z| z.timestamp())
            .map_err(|_| SelectError::BadTime(text.to_string()));
    }
    t.parse::<Timestamp>()
        .or_else(|_| t.replacen(' ', "T", 1).parse::<Timestamp>())
        .map_err(|_| SelectError::BadTime(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dr_core::manifest::{BackupId, Compression, Encryption, FORMAT_VERSION};

    fn manifest(at: &str) -> Manifest {
        let t: Timestamp = at.parse().unwrap();
        Manifest {
            format: FORMAT_VERSION,
            id: BackupId::new(t),
            environment: "e".into(),
            database: "app".into(),
            classes: vec!["daily".into()],
            started_at: t,
            finished_at: t,
            server_version: "15.18".into(),
            server_version_num: 150018,
            pg_dump_version: "15.18".into(),
            dr_version: "0".into(),
            compression: Compression {
                algorithm: "zstd".into(),
                level: 3,
            },
            encryption: Encryption {
                algorithm: "age".into(),
                recipients: vec![],
            },
            objects: vec![],
            row_counts_unavailable: None,
            continuous_base: None,
            restore_order: Vec::new(),
        }
    }

    fn three() -> Vec<Manifest> {
        vec![
            manifest("2026-11-20T03:00:00Z"),
            manifest("2026-11-21T03:00:00Z"),
            manifest("2026-11-22T03:00:00Z"),
        ]
    }

    #[test]
    fn before_picks_the_newest_at_or_before() {
        let b = three();
        let at = |s: &str| Selector::Before(s.parse().unwrap());
        assert_eq!(
            select(&b, "app", &at("2026-11-21T12:00:00Z"), "")
                .unwrap()
                .id,
            b[1].id
        );
        assert_eq!(
            select(&b, "app", &at("2026-11-21T03:00:00Z"), "")
                .unwrap()
                .id,
            b[1].id
        );
        assert_eq!(
            select(&b, "app", &Selector::Latest, "").unwrap().id,
            b[2].id
        );
        let err = select(&b, "app", &at("2026-11-19T00:00:00Z"), "")
            .unwrap_err()
            .to_string();
        assert!(err.contains(b[0].id.as_str()), "{err}");
    }

    #[test]
    fn unknown_id_lists_the_nearest() {
        let b = three();
        let err = select(&b, "app", &Selector::Id("20261121T040000Z-0000".into()), "")
            .unwrap_err()
            .to_string();
        let first = err.split("nearest ids: ").nth(1).unwrap();
        assert!(first.starts_with(b[1].id.as_str()), "{err}");
    }

    #[test]
    fn times_parse_absolute_and_relative() {
        let now: Timestamp = "2026-11-22T12:00:00Z".parse().unwrap();
        assert_eq!(
            parse_time("2h ago", now).unwrap(),
            "2026-11-22T10:00:00Z".parse::<Timestamp>().unwrap()
        );
        assert_eq!(
            parse_time("3 days ago", now).unwrap(),
            "2026-11-19T12:00:00Z".parse::<Timestamp>().unwrap()
        );
        assert_eq!(
            parse_time("2026-11-22 03:00:00+01:00", now).unwrap(),
            "2026-11-22T02:00:00Z".parse::<Timestamp>().unwrap()
        );
        assert!(parse_time("yesterday-ish", now).is_err());
    }
}
