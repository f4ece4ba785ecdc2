//! Where dr looks for PostgreSQL binaries: the client tools (`pg_dump`, `pg_restore`,
//! `psql`) and, for ephemeral drills and `dr demo`, the server (`initdb`, `pg_ctl`,
//! `postgres`). Both use the same search, so one setting points dr at one installation:
//!
//! - `DR_PG_BINDIR` (a list like `PATH`): when set, only these directories are searched;
//! - otherwise every directory on `PATH`, then `/usr/lib/postgresql/*/bin` (Debian's layout).
//!
//! Among the directories found, callers pick by major version (see `pg::PgTools`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The environment variable that points dr at PostgreSQL installations.
pub const BINDIR_ENV: &str = "DR_PG_BINDIR";

/// Directories to search for PostgreSQL binaries, in order of preference.
pub fn search_dirs() -> Vec<PathBuf> {
    search_dirs_from(
        std::env::var_os(BINDIR_ENV),
        std::env::var_os("PATH"),
        Path::new("/usr/lib/postgresql"),
    )
}

/// [`search_dirs`] with its inputs given: `bindir` is `DR_PG_BINDIR`, `path` is `PATH`,
/// `versions_root` holds one directory per major version, each with a `bin/`.
pub fn search_dirs_from(
    bindir: Option<OsString>,
    path: Option<OsString>,
    versions_root: &Path,
) -> Vec<PathBuf> {
    if let Some(list) = bindir.filter(|b| !b.is_empty()) {
        return std::env::split_paths(&list)
            .filter(|d| !d.as_os_str().is_empty())
            .collect();
    }
    let mut dirs: Vec<PathBuf> = path
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Ok(entries) = std::fs::read_dir(versions_root) {
        let mut versions: Vec<PathBuf> = entries.flatten().map(|e| e.path().join("bin")).collect();
        versions.sort();
        dirs.extend(versions);
    }
    dirs
}

/// Where the search looked, for error messages.
pub fn searched() -> String {
    match std::env::var_os(BINDIR_ENV).filter(|b| !b.is_empty()) {
        Some(list) => format!("{BINDIR_ENV}={}", list.to_string_lossy()),
        None => format!(
            "PATH and /usr/lib/postgresql/*/bin; set {BINDIR_ENV} to a PostgreSQL bin directory to use another installation"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bindir_list_replaces_path_and_debian_layout() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("15/bin")).unwrap();
        let dirs = search_dirs_from(
            Some("/opt/pg17/bin:/opt/pg16/bin".into()),
            Some("/usr/bin".into()),
            root.path(),
        );
        assert_eq!(
            dirs,
            vec![
                PathBuf::from("/opt/pg17/bin"),
                PathBuf::from("/opt/pg16/bin")
            ]
        );
    }

    #[test]
    fn without_bindir_path_comes_before_debian_layout() {
        let root = tempfile::tempdir().unwrap();
        for v in ["16", "15"] {
            std::fs::create_dir_all(root.path().join(v).join("bin")).unwrap();
        }
        let dirs = search_dirs_from(Some("".into()), Some("/a:/b".into()), root.path());
        assert_eq!(
            dirs,
            vec![
                PathBuf::from("/a"),
                PathBuf::from("/b"),
                root.path().join("15/bin"),
                root.path().join("16/bin"),
            ]
        );
    }
}
