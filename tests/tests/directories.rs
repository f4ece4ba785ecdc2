//! End-to-end tests of `[[directories]]`: trees of files backed up like databases.
//!
//! What they prove: a tree (nested directories, modes, mtimes, symlinks, an empty file, an
//! empty directory, long and non-ASCII names, a large file; a 1 GiB file) round-trips through `dr backup --directory` and
//! `dr restore --directory` equal entry for entry, on file:// and S3; the stock tools alone
//! (`age -d | zstd -d | tar -x`) restore it too; a non-empty output is refused without
//! --force; a file that changes while it is read is reported; database listings ignore
//! directory backups.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use dr_tests::{
    decrypt_to_bytes, encryption_toml, keygen, write_config, Dr, DrOutput, Garage, Storage,
};
use serde_json::Value;

fn json(out: &DrOutput) -> Value {
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON on stdout ({e}):\nstdout:\n{}\nstderr:\n{}",
            out.stdout, out.stderr
        )
    })
}

/// A tree with what trips naive copies.
fn make_tree(root: &Path) {
    let deep = root.join("a/b/c");
    fs::create_dir_all(&deep).unwrap();
    fs::write(root.join("top.txt"), "top\n").unwrap();
    fs::write(deep.join("deep.bin"), vec![7u8; 70_000]).unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    let empty_dir = root.join("a/empty dir");
    fs::create_dir(&empty_dir).unwrap();
    fs::set_permissions(&empty_dir, fs::Permissions::from_mode(0o711)).unwrap();
    fs::write(root.join("a/naïve résumé.txt"), "unicode\n").unwrap();
    let long = "x".repeat(120);
    fs::write(root.join("a/b").join(&long), "long name\n").unwrap();
    let script = root.join("run.sh");
    fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o750)).unwrap();
    fs::set_permissions(root.join("top.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    symlink("a/b/c/deep.bin", root.join("link")).unwrap();
    symlink("/nonexistent/target", root.join("dangling")).unwrap();
    // 5 MiB that does not compress: several pipeline parts.
    fs::write(root.join("a/big.dat"), incompressible(5 << 20)).unwrap();
}

/// `len` bytes (a multiple of 8) of xorshift output: nothing for zstd to shrink.
fn incompressible(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// Every entry under `root`: kind, content digest or link target, mode, mtime.
fn snapshot(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let meta = fs::symlink_metadata(&path).unwrap();
            let what = if meta.file_type().is_symlink() {
                format!("link->{}", fs::read_link(&path).unwrap().display())
            } else if meta.is_dir() {
                stack.push(path.clone());
                format!("dir {:o}", meta.permissions().mode() & 0o7777)
            } else {
                let digest = file_sha256(&path);
                format!(
                    "file {:o} {} {digest}",
                    meta.permissions().mode() & 0o7777,
                    meta.mtime()
                )
            };
            out.insert(rel, what);
        }
    }
    out
}

fn file_sha256(path: &Path) -> String {
    use sha2::Digest;
    use std::io::Read;
    let mut file = fs::File::open(path).unwrap();
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break hex::encode(hasher.finalize());
        }
        hasher.update(&buf[..n]);
    }
}

struct Bed {
    tmp: tempfile::TempDir,
    identity: PathBuf,
    config: PathBuf,
    source: PathBuf,
}

impl Bed {
    fn new(storage: impl FnOnce(&Path) -> Storage) -> Bed {
        let tmp = tempfile::Builder::new()
            .prefix("dr-directories-")
            .tempdir()
            .unwrap();
        let keys = keygen(tmp.path());
        let source = tmp.path().join("uploads");
        fs::create_dir(&source).unwrap();
        make_tree(&source);
        let body = encryption_toml(&[&keys.recipient], Some(&keys.identity))
            + &format!(
                "[[directories]]\nname = \"uploads\"\npath = \"{}\"\n  [[directories.schedules]]\n  class = \"daily\"\n  cron = \"0 3 * * *\"\n  keep = \"30d\"\n",
                source.display()
            );
        let storage = storage(tmp.path());
        let config = write_config(tmp.path(), &storage, &body);
        Bed {
            identity: keys.identity,
            config,
            source,
            tmp,
        }
    }

    /// `dr backup --directory uploads`, which must succeed: its manifest.
    fn backup(&self) -> Value {
        let out = Dr::new(&self.config)
            .args(["backup", "--directory", "uploads", "--json"])
            .run();
        out.assert_success();
        json(&out)
    }

    fn restore(&self, dr: Dr, output: &Path) -> DrOutput {
        dr.args(["restore", "--directory", "uploads", "--json", "--output"])
            .arg(output)
            .arg("--staging-dir")
            .arg(self.tmp.path())
            .run()
    }
}

#[test]
fn a_tree_round_trips_entry_for_entry_and_the_stock_tools_restore_it() {
    let bed = Bed::new(|dir| Storage::File(dir.join("repo")));
    let dr = || Dr::new(&bed.config);
    let manifest = bed.backup();
    assert_eq!(manifest["kind"], "directory");
    assert_eq!(manifest["files"], 7, "{manifest:#}");
    assert_eq!(manifest["symlinks"], 2, "{manifest:#}");
    assert_eq!(manifest["changed_files"], 0, "{manifest:#}");
    let id = manifest["id"].as_str().unwrap().to_string();
    // No path or file name in the manifest: those are only in the encrypted listing.
    let text = manifest.to_string();
    assert!(
        !text.contains("top.txt") && !text.contains("résumé"),
        "{text}"
    );

    let want = snapshot(&bed.source);
    let restored = bed.tmp.path().join("restored");
    let out = bed.restore(dr(), &restored);
    out.assert_success();
    let report = json(&out);
    assert_eq!(report["backup_id"], id.as_str());
    assert_eq!(report["files"], 7);
    assert_eq!(snapshot(&restored), want);

    // Not over a non-empty directory without --force.
    bed.restore(dr(), &restored)
        .assert_failure_mentions(&["is not empty", "--force"]);
    fs::write(restored.join("top.txt"), "overwritten\n").unwrap();
    let forced = dr()
        .args(["restore", "--directory", "uploads", "--force", "--output"])
        .arg(&restored)
        .arg("--staging-dir")
        .arg(bed.tmp.path())
        .run();
    forced.assert_success();
    assert_eq!(snapshot(&restored), want);

    // Stock tools only: age, zstd, tar.
    let object = bed
        .tmp
        .path()
        .join("repo/test/uploads/backups")
        .join(&id)
        .join("data.tar.zst.age");
    let tar_bytes = decrypt_to_bytes(&bed.identity, &object);
    let by_hand = bed.tmp.path().join("by-hand");
    fs::create_dir(&by_hand).unwrap();
    let mut tar = Command::new("tar")
        .arg("-x")
        .arg("-p")
        .arg("-C")
        .arg(&by_hand)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    tar.stdin.take().unwrap().write_all(&tar_bytes).unwrap();
    assert!(tar.wait().unwrap().success());
    assert_eq!(snapshot(&by_hand), want);

    // Database listings are not confused by a directory backup.
    let list = dr().args(["list"]).run();
    list.assert_success();
    assert!(!list.stderr.contains("unreadable"), "{}", list.stderr);
}

#[test]
fn a_one_gib_file_round_trips() {
    let bed = Bed::new(|dir| Storage::File(dir.join("repo")));
    // Sparse, with distinct bytes at both ends and across the 4 GiB-of-bits boundary of
    // a 32-bit byte count (512 MiB), so a truncated or shifted copy cannot match.
    let big = bed.source.join("a/one-gib.img");
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = fs::File::create(&big).unwrap();
        for (at, byte) in [(0u64, 1u8), (512 << 20, 2), ((1 << 30) - (1 << 20), 3)] {
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(&vec![byte; 1 << 20]).unwrap();
        }
        assert_eq!(f.metadata().unwrap().len(), 1 << 30);
    }
    let dr = || Dr::new(&bed.config);
    let manifest = bed.backup();
    assert_eq!(manifest["files"], 8, "{manifest:#}");
    assert!(
        manifest["bytes"].as_u64().unwrap() > 1 << 30,
        "{manifest:#}"
    );
    let want = snapshot(&bed.source);
    let restored = bed.tmp.path().join("restored");
    bed.restore(dr(), &restored).assert_success();
    assert_eq!(
        fs::metadata(restored.join("a/one-gib.img")).unwrap().len(),
        1 << 30
    );
    assert_eq!(snapshot(&restored), want);
}

#[test]
fn a_changing_file_is_reported_and_a_damaged_object_fails_the_restore() {
    let bed = Bed::new(|dir| Storage::File(dir.join("repo")));
    let growing = bed.source.join("growing.log");
    fs::write(&growing, vec![b'x'; 8 << 20]).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let out = std::thread::scope(|s| {
        s.spawn(|| {
            let mut f = fs::OpenOptions::new().append(true).open(&growing).unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                use std::io::Write;
                f.write_all(&[b'y'; 4096]).unwrap();
            }
        });
        let out = Dr::new(&bed.config)
            .args(["backup", "--directory", "uploads", "--json"])
            .run();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        out
    });
    out.assert_success();
    let manifest = json(&out);
    assert_eq!(manifest["changed_files"], 1, "{manifest:#}");
    assert_eq!(manifest["changed"], serde_json::json!(["growing.log"]));
    assert!(out.stderr.contains("changed while"), "{}", out.stderr);

    // A flipped byte in the stored tar: the restore fails before writing anything.
    let id = manifest["id"].as_str().unwrap();
    let object = bed
        .tmp
        .path()
        .join("repo/test/uploads/backups")
        .join(id)
        .join("data.tar.zst.age");
    let mut bytes = fs::read(&object).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    fs::write(&object, bytes).unwrap();
    let restored = bed.tmp.path().join("restored");
    bed.restore(Dr::new(&bed.config), &restored)
        .assert_failure_mentions(&["data.tar.zst.age", "verification"]);
    assert!(
        fs::read_dir(&restored).map_or(true, |mut d| d.next().is_none()),
        "a damaged backup wrote files"
    );
}

#[test]
fn a_tree_round_trips_through_s3() {
    let garage = Garage::start();
    let bed = Bed::new(|_| Storage::garage(&garage, "dirs"));
    let dr = || Dr::new(&bed.config).envs(garage.env());
    dr().args(["backup", "--directory", "uploads"])
        .run()
        .assert_success();
    let restored = bed.tmp.path().join("restored");
    bed.restore(dr(), &restored).assert_success();
    assert_eq!(snapshot(&restored), snapshot(&bed.source));
}

#[test]
fn the_agent_backs_up_a_directory_on_its_schedule_and_prunes_it() {
    let bed = Bed::new(|dir| Storage::File(dir.join("repo")));
    // Every two seconds, kept one second: only the newest backups stay.
    let port = dr_tests::free_port();
    let text = fs::read_to_string(&bed.config)
        .unwrap()
        .replace("cron = \"0 3 * * *\"", "cron = \"*/2 * * * * *\"")
        .replace("keep = \"30d\"", "keep = \"1s\"")
        + &format!("\n[agent]\nlisten = \"127.0.0.1:{port}\"\n");
    fs::write(&bed.config, text).unwrap();
    let agent = dr_tests::Agent::start(Dr::new(&bed.config), port);
    let backups = bed.tmp.path().join("repo/test/uploads/backups");
    let count = || fs::read_dir(&backups).map_or(0, |d| d.count());
    let logged = dr_tests::wait_until(std::time::Duration::from_secs(30), || {
        agent.log_count("directory backed up") >= 3
    });
    assert!(logged, "{}", agent.log());
    assert!(count() <= 2, "retention kept {} backups", count());
    let labels = [("database", "uploads"), ("class", "daily")];
    let metrics = agent.metrics();
    assert!(
        dr_tests::metric_value(
            &metrics,
            "dr_backup_last_success_timestamp_seconds",
            &labels
        )
        .is_some(),
        "{metrics}"
    );
    assert!(
        dr_tests::metric_value(&metrics, "dr_rpo_seconds", &[("database", "uploads")])
            .is_some_and(|r| r < 10.0),
        "{metrics}"
    );
    // What it stored restores.
    let restored = bed.tmp.path().join("restored");
    bed.restore(Dr::new(&bed.config), &restored)
        .assert_success();
    assert_eq!(snapshot(&restored), snapshot(&bed.source));
}

#[test]
fn a_directory_past_its_rpo_alerts_once() {
    let bed = Bed::new(|dir| Storage::File(dir.join("repo")));
    let port = dr_tests::free_port();
    let hook = dr_tests::WebhookReceiver::start();
    // One backup now, the next not before 03:00, and an objective of 3 s.
    let text = fs::read_to_string(&bed.config)
        .unwrap()
        .replace("name = \"uploads\"\n", "name = \"uploads\"\nrpo = \"3s\"\n")
        + &format!(
            "\n[agent]\nlisten = \"127.0.0.1:{port}\"\n\n[[notify]]\nurl = \"{}\"\n",
            hook.url("/hook")
        );
    fs::write(&bed.config, text).unwrap();
    bed.backup();
    let agent = dr_tests::Agent::start(Dr::new(&bed.config), port);
    let breaches = || {
        hook.json_bodies()
            .into_iter()
            .filter(|b| b["event"] == "rpo_breach" && b["database"] == "uploads")
            .count()
    };
    let alerted = dr_tests::wait_until(std::time::Duration::from_secs(30), || breaches() == 1);
    assert!(alerted, "{:?}\n{}", hook.events(), agent.log());
    std::thread::sleep(std::time::Duration::from_secs(6));
    assert_eq!(breaches(), 1, "{:?}", hook.events());
}

#[test]
fn a_directory_drill_proves_the_tree_and_fails_on_a_damaged_backup() {
    let bed = Bed::new(|dir| Storage::File(dir.join("repo")));
    let dr = || Dr::new(&bed.config);
    let id = bed.backup()["id"].as_str().unwrap().to_string();
    let drill = dr()
        .args(["drill", "--directory", "uploads", "--json"])
        .run();
    drill.assert_success();
    let report = &json(&drill)[0];
    assert_eq!(report["passed"], true, "{report:#}");
    assert_eq!(report["backup_id"], id.as_str());
    assert!(report["rto_seconds"].as_f64().is_some_and(|s| s > 0.0));
    assert!(report["checks"][0]["detail"]
        .as_str()
        .unwrap()
        .contains("7 files"));

    let object = bed
        .tmp
        .path()
        .join("repo/test/uploads/backups")
        .join(&id)
        .join("data.tar.zst.age");
    let mut bytes = fs::read(&object).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 1;
    fs::write(&object, bytes).unwrap();
    let failed = dr()
        .args(["drill", "--directory", "uploads", "--json"])
        .run();
    assert!(!failed.status.success(), "{}", failed.stdout);
    assert_eq!(json(&failed)[0]["passed"], false);
    let history = json(
        &dr()
            .args(["drill", "history", "--database", "uploads", "--json"])
            .run(),
    );
    assert_eq!(history.as_array().map(Vec::len), Some(2), "{history:#}");
}

/// Runs `dr` and returns (its exit code, stdout, its own peak RSS in KiB). The peak is the
/// VmHWM of dr's own address space, polled until it exits: wait4's ru_maxrss would not do,
/// as exec folds the spawning process's high-water mark in (this test binary's, which grows
/// with whatever other tests hold at the time).
fn run_measured(dr: Dr, dir: &Path) -> (i32, String, i64) {
    let out_path = dir.join("measured.out");
    let mut child = dr
        .into_command()
        .stdout(fs::File::create(&out_path).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0;
    let status = loop {
        if let Ok(text) = fs::read_to_string(&status_file) {
            if let Some(kib) = text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
            {
                peak_kib = peak_kib.max(kib);
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    // Polled at least once while it ran (a 100,000-file walk takes seconds).
    assert!(peak_kib > 0, "dr exited before its memory could be read");
    (
        status.code().unwrap_or(-1),
        fs::read_to_string(&out_path).unwrap(),
        peak_kib,
    )
}

#[test]
fn memory_stays_bounded_on_a_tree_of_a_hundred_thousand_files() {
    let bed = Bed::new(|dir| Storage::File(dir.join("repo")));
    let many = bed.source.join("many");
    for d in 0..1000 {
        let dir = many.join(format!("d{d:04}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..100 {
            fs::write(dir.join(format!("f{f:03}.txt")), format!("{d}/{f}\n")).unwrap();
        }
    }
    let (code, stdout, peak_kib) = run_measured(
        Dr::new(&bed.config).args(["backup", "--directory", "uploads", "--json"]),
        bed.tmp.path(),
    );
    assert_eq!(code, 0, "{stdout}");
    let manifest: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(manifest["files"], 100_007, "{manifest:#}");
    let peak_mib = peak_kib / 1024;
    eprintln!("peak RSS of dr over 100,007 files: {peak_mib} MiB");
    assert!(peak_mib < 64, "peak RSS {peak_mib} MiB");
}

/// Runs `dr` as the unprivileged `nobody` when this test runs as root (root reads every
/// file, so only another user can meet an unreadable one); as itself otherwise.
fn as_unprivileged(dr: Dr) -> DrOutput {
    let command = dr.into_command();
    let mut wrapped = if unsafe { libc::geteuid() } == 0 {
        let mut c = Command::new("runuser");
        c.args(["-u", "nobody", "--"]).arg(command.get_program());
        c
    } else {
        Command::new(command.get_program())
    };
    wrapped.args(command.get_args()).stdin(Stdio::null());
    for (k, v) in command.get_envs() {
        match v {
            Some(v) => wrapped.env(k, v),
            None => wrapped.env_remove(k),
        };
    }
    let out = wrapped.output().expect("run dr");
    DrOutput {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn an_unreadable_file_fails_the_backup_unless_skip_unreadable() {
    let bed = Bed::new(|dir| Storage::File(dir.join("repo")));
    let secret = bed.source.join("a/secret.key");
    fs::write(&secret, "only root\n").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o000)).unwrap();
    if unsafe { libc::geteuid() } == 0 {
        // `nobody` may read everything else, the config and keys, and write the repository.
        let chown = |path: &Path| {
            let ok = Command::new("chown")
                .arg("-R")
                .arg("nobody")
                .arg(path)
                .status()
                .unwrap();
            assert!(ok.success());
        };
        fs::set_permissions(bed.tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
        fs::create_dir_all(bed.tmp.path().join("repo")).unwrap();
        chown(&bed.tmp.path().join("repo"));
        chown(&bed.config);
        chown(&bed.identity);
        chown(&bed.source);
        let ok = Command::new("chown")
            .arg("root")
            .arg(&secret)
            .status()
            .unwrap();
        assert!(ok.success());
    }
    let backup = || Dr::new(&bed.config).args(["backup", "--directory", "uploads", "--json"]);
    let out = as_unprivileged(backup());
    out.assert_failure_mentions(&["secret.key", "cannot be read", "no backup was recorded"]);
    let backups = bed.tmp.path().join("repo/test/uploads/backups");
    let committed = fs::read_dir(&backups)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.path().join("manifest.json").exists())
                .count()
        })
        .unwrap_or(0);
    assert_eq!(committed, 0, "a backup missing a file was committed");

    let text = fs::read_to_string(&bed.config).unwrap().replace(
        "[[directories]]\n",
        "[[directories]]\nskip_unreadable = true\n",
    );
    fs::write(&bed.config, text).unwrap();
    let out = as_unprivileged(backup());
    out.assert_success();
    let manifest = json(&out);
    assert_eq!(manifest["skipped_files"], 1, "{manifest:#}");
    assert_eq!(manifest["skipped"], serde_json::json!(["a/secret.key"]));
    assert!(out.stderr.contains("skipped"), "{}", out.stderr);
}

#[test]
fn a_copy_holds_directory_backups_and_prunes_them_by_its_own_keep() {
    let bed = Bed::new(|dir| Storage::File(dir.join("repo")));
    let port = dr_tests::free_port();
    // Every two seconds; the primary keeps 30 days, the copy one second.
    let cold = bed.tmp.path().join("cold");
    let text = fs::read_to_string(&bed.config)
        .unwrap()
        .replace("cron = \"0 3 * * *\"", "cron = \"*/2 * * * * *\"")
        + &format!(
            "\n[[copies]]\nname = \"cold\"\ninterval_seconds = 1\n  [copies.storage]\n  url = \"file://{}\"\n  [copies.keep]\n  daily = \"1s\"\n\n[agent]\nlisten = \"127.0.0.1:{port}\"\n",
            cold.display()
        );
    fs::write(&bed.config, text).unwrap();
    let agent = dr_tests::Agent::start(Dr::new(&bed.config), port);
    let count = |root: &Path| {
        fs::read_dir(root.join("test/uploads/backups")).map_or(0, |d| {
            d.filter_map(Result::ok)
                .filter(|e| e.path().join("manifest.json").exists())
                .count()
        })
    };
    let primary = bed.tmp.path().join("repo");
    let done = dr_tests::wait_until(std::time::Duration::from_secs(40), || {
        count(&primary) >= 4 && (1..=2).contains(&count(&cold))
    });
    assert!(
        done,
        "primary {} backups, copy {}:\n{}",
        count(&primary),
        count(&cold),
        agent.log()
    );
    // The copy's RPO is tracked like the primary's.
    let rpo = |repository: &str| {
        dr_tests::metric_value(
            &agent.metrics(),
            "dr_rpo_seconds",
            &[("database", "uploads"), ("repository", repository)],
        )
    };
    let tracked = dr_tests::wait_until(std::time::Duration::from_secs(20), || {
        rpo("cold").is_some_and(|r| r < 60.0) && rpo("primary").is_some_and(|r| r < 60.0)
    });
    assert!(tracked, "{}", agent.metrics());
    // The copy restores the tree.
    drop(agent);
    let restored = bed.tmp.path().join("restored");
    Dr::new(&bed.config)
        .args([
            "restore",
            "--directory",
            "uploads",
            "--repository",
            "cold",
            "--output",
        ])
        .arg(&restored)
        .arg("--staging-dir")
        .arg(bed.tmp.path())
        .run()
        .assert_success();
    assert_eq!(snapshot(&restored), snapshot(&bed.source));
}

#[test]
fn dr_prune_applies_each_repositorys_keep_to_directory_backups() {
    let bed = Bed::new(|dir| Storage::File(dir.join("repo")));
    let cold = bed.tmp.path().join("cold");
    // `primary` and `copy`: each repository's keep of the dailies.
    let configure = |primary: &str, copy: &str| {
        let text = fs::read_to_string(&bed.config).unwrap();
        let text = text.split("\n[[copies]]").next().unwrap().to_string();
        let text = text
            .lines()
            .map(|l| match l.trim_start().starts_with("keep = ") {
                true => format!("  keep = \"{primary}\""),
                false => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        let copies = format!(
            "\n[[copies]]\nname = \"cold\"\n  [copies.storage]\n  url = \"file://{}\"\n  [copies.keep]\n  daily = \"{copy}\"\n",
            cold.display()
        );
        fs::write(&bed.config, text + "\n" + &copies).unwrap();
    };
    configure("30d", "1s");
    let mut ids = Vec::new();
    for _ in 0..3 {
        let out = Dr::new(&bed.config)
            .args([
                "backup",
                "--directory",
                "uploads",
                "--class",
                "daily",
                "--json",
            ])
            .run();
        out.assert_success();
        ids.push(json(&out)["id"].as_str().unwrap().to_string());
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    let copy = || {
        Dr::new(&bed.config)
            .args(["copy", "--to", "cold"])
            .run()
            .assert_success();
    };
    // Backups the copy's keep would delete at once are not sent to it: sent, they would be
    // pruned and sent again on every pass.
    let out = Dr::new(&bed.config)
        .args(["copy", "--to", "cold", "--json"])
        .run();
    out.assert_success();
    let unit = |id: &str| format!("test/uploads/backups/{id}");
    let report = &json(&out)[0];
    assert_eq!(
        report["copied"],
        serde_json::json!([unit(&ids[2])]),
        "{report:#}"
    );
    assert_eq!(
        report["beyond_keep"],
        serde_json::json!([unit(&ids[0]), unit(&ids[1])]),
        "{report:#}"
    );
    // With the primary's keep the copy takes all three; then it keeps one second again.
    configure("30d", "30d");
    copy();
    configure("30d", "1s");
    std::thread::sleep(std::time::Duration::from_secs(2));
    let committed = |root: &Path| -> Vec<String> {
        let mut ids: Vec<String> = fs::read_dir(root.join("test/uploads/backups"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.path().join("manifest.json").exists())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids
    };
    let primary = bed.tmp.path().join("repo");
    assert_eq!(
        committed(&cold),
        ids,
        "dr copy copied every directory backup"
    );
    let prune = |args: &[&str]| {
        let out = Dr::new(&bed.config).arg("prune").args(args).run();
        out.assert_success();
        out
    };
    // The copy by its own keep (one second, not the primary's 30 days): only the newest stays.
    let report = json(&prune(&["--repository", "cold", "--json"]));
    let entry = report
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"] == "directory" && r["directory"] == "uploads")
        .unwrap_or_else(|| panic!("no directory entry in {report:#}"))
        .clone();
    let deleted: Vec<&str> = entry["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["keep"] == false)
        .map(|d| d["backup_id"].as_str().unwrap())
        .collect();
    assert_eq!(deleted, [ids[0].as_str(), ids[1].as_str()], "{entry:#}");
    assert_eq!(committed(&cold), [ids[2].clone()]);
    assert_eq!(committed(&primary), ids);
    // Now the primary keeps one second and the copy 30 days: pruning the copy (refilled)
    // keeps all three there and must not touch the primary.
    configure("1s", "30d");
    copy();
    assert_eq!(committed(&cold), ids);
    // A leftover of a backup that died long ago (objects, no manifest), in both.
    let plant = |root: &Path| {
        let leftover = root.join("test/uploads/backups/20200101T000000Z-dead");
        fs::create_dir_all(&leftover).unwrap();
        let stale = fs::File::create(leftover.join("data.tar.zst.age")).unwrap();
        stale
            .set_modified(
                std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_577_836_800),
            )
            .unwrap();
        leftover
    };
    let leftover = plant(&primary);
    let cold_leftover = plant(&cold);
    prune(&["--repository", "cold"]);
    assert_eq!(committed(&cold), ids);
    assert_eq!(
        committed(&primary),
        ids,
        "pruning the copy pruned the primary"
    );
    // In a copy, a catch-up copy in flight looks like a leftover: only the agent removes it.
    assert!(cold_leftover.join("data.tar.zst.age").exists());
    assert!(leftover.join("data.tar.zst.age").exists());
    // The primary by its own keep, dry first.
    let dry = prune(&["--dry-run"]);
    assert!(
        dry.stdout
            .contains(&format!("would delete {}  uploads (directory)", ids[0]))
            && dry
                .stdout
                .contains("20200101T000000Z-dead/data.tar.zst.age"),
        "{}",
        dry.stdout
    );
    assert_eq!(committed(&primary), ids, "--dry-run deleted something");
    assert!(
        leftover.join("data.tar.zst.age").exists(),
        "--dry-run deleted the leftover"
    );
    let report = json(&prune(&["--directory", "uploads", "--json"]));
    assert_eq!(
        report[0]["orphans"],
        serde_json::json!(["test/uploads/backups/20200101T000000Z-dead/data.tar.zst.age"]),
        "{report:#}"
    );
    assert_eq!(committed(&primary), [ids[2].clone()]);
    assert!(!leftover.join("data.tar.zst.age").exists());
    // A directory that is not configured is named as such.
    let out = Dr::new(&bed.config)
        .args(["prune", "--directory", "nope"])
        .run();
    assert!(!out.status.success());
    assert!(
        out.stderr
            .contains("no `[[directories]]` entry is named `nope`"),
        "{}",
        out.stderr
    );
}

/// `source = "s3://bucket/prefix"`: the prefix's objects (more than one listing page, small
/// ones fetched ahead and a large one streamed) become the tree; keys outside the prefix stay
/// out; a folder marker becomes a directory; a key below another object's key (which no tree
/// can hold) is skipped and named; the restore and the drill prove the tree.
#[test]
fn an_s3_prefix_is_backed_up_as_a_tree_and_restored() {
    let garage = Garage::start();
    let s3 = garage.client();
    let bucket = garage.bucket();
    let big = incompressible(3 << 20);
    let mut expected: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (key, body) in [
        ("avatars/1.png", b"png one".to_vec()),
        ("avatars/2.png", Vec::new()),
        ("docs/naïve résumé.pdf", b"pdf".to_vec()),
        ("big.bin", big),
        ("report", b"a file".to_vec()),
    ] {
        expected.insert(key.to_string(), body);
    }
    for i in 0..1100 {
        expected.insert(
            format!("many/{i:04}.txt"),
            format!("object {i}\n").into_bytes(),
        );
    }
    for (key, body) in &expected {
        s3.put(bucket, &format!("uploads/{key}"), body.clone());
    }
    s3.put(bucket, "uploads/empty folder/", Vec::new());
    s3.put(bucket, "uploads/report/2026.csv", b"below a file".to_vec());
    s3.put(bucket, "uploadsX/not-mine", b"outside".to_vec());
    s3.put(bucket, "other/not-mine", b"outside".to_vec());

    let tmp = tempfile::Builder::new()
        .prefix("dr-s3-source-")
        .tempdir()
        .unwrap();
    let keys = keygen(tmp.path());
    let body = encryption_toml(&[&keys.recipient], Some(&keys.identity))
        + &format!(
            "[[directories]]\nname = \"media\"\n  [directories.source]\n  url = \"s3://{bucket}/uploads\"\n  endpoint = \"{}\"\n  region = \"{}\"\n  path_style = true\n",
            garage.endpoint(),
            Garage::REGION
        );
    let config = write_config(tmp.path(), &Storage::garage(&garage, "dirs"), &body);
    let dr = || Dr::new(&config).envs(garage.env());

    let check = dr().args(["config", "check"]).run();
    check.assert_success();
    assert!(
        check.stdout.contains("directory media (s3://") && check.stdout.contains("listed and read"),
        "{}",
        check.stdout
    );
    let out = dr()
        .args(["backup", "--directory", "media", "--json"])
        .run();
    out.assert_success();
    let manifest = json(&out);
    assert_eq!(manifest["files"], expected.len(), "{manifest:#}");
    assert_eq!(manifest["directories"], 1, "{manifest:#}");
    assert_eq!(manifest["skipped_files"], 1, "{manifest:#}");
    assert_eq!(manifest["skipped"][0], "report/2026.csv", "{manifest:#}");
    assert_eq!(manifest["changed_files"], 0, "{manifest:#}");
    let bytes: usize = expected.values().map(Vec::len).sum();
    assert_eq!(manifest["bytes"], bytes, "{manifest:#}");

    let restored = tmp.path().join("restored");
    let out = dr()
        .args(["restore", "--directory", "media", "--json", "--output"])
        .arg(&restored)
        .arg("--staging-dir")
        .arg(tmp.path())
        .run();
    out.assert_success();
    assert_eq!(json(&out)["verified"], expected.len() + 1);
    let mut found = BTreeMap::new();
    let mut stack = vec![restored.clone()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(&restored).unwrap().display().to_string();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
            assert_eq!(mode, 0o644, "{rel}");
            found.insert(rel, fs::read(&path).unwrap());
        }
    }
    assert!(
        found == expected,
        "restored keys: {:?}",
        found.keys().take(8).collect::<Vec<_>>()
    );
    assert!(restored.join("empty folder").is_dir());

    let drill = dr().args(["drill", "--directory", "media", "--json"]).run();
    drill.assert_success();
    assert_eq!(json(&drill)[0]["passed"], true, "{}", drill.stdout);

    // A source that cannot be listed fails the backup, names the directory, commits nothing.
    let gone = body.replace("name = \"media\"", "name = \"gone\"").replace(
        &format!("s3://{bucket}/uploads"),
        "s3://no-such-bucket/uploads",
    );
    let gone_config = write_config(tmp.path(), &Storage::garage(&garage, "dirs"), &gone);
    Dr::new(&gone_config)
        .envs(garage.env())
        .args(["config", "check"])
        .run()
        .assert_failure_mentions(&["directory gone reads s3://no-such-bucket/uploads but cannot"]);
    Dr::new(&gone_config)
        .envs(garage.env())
        .args(["backup", "--directory", "gone"])
        .run()
        .assert_failure_mentions(&["directory `gone`", "no-such-bucket"]);
    let stored = s3.list(bucket, "dirs/test/gone/");
    assert!(
        !stored.iter().any(|k| k.ends_with("manifest.json")),
        "{stored:?}"
    );
}
