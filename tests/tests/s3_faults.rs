//! Object storage on real networks: the built `dr` against a real Garage behind the test
//! bed's fault-injecting proxy ([`FaultProxy`]). Every test builds its own cluster, Garage,
//! proxy and keys.
//!
//! Each fault ends one of two ways (FAULTS.md 8): `dr` retries or resumes and finishes with
//! a matching sha256, or it fails with a clear error, no manifest and no open upload.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dr_tests::{
    create_seeded, database_toml, encryption_toml, seed_incompressible, table_hashes, write_config,
    BedBase, Direction, Dr, DrOutput, Fault, FaultProxy, Garage, Repo, Storage,
};

const ENV: &str = "test";
const MIB: u64 = 1024 * 1024;

/// A seeded cluster, a Garage, a proxy in front of it, and a config that reaches Garage
/// only through the proxy.
struct Bed {
    base: BedBase,
    proxy: FaultProxy,
    config: PathBuf,
}

impl Bed {
    /// `bulk_mib` MiB of incompressible rows on top of the seed, so the stored object spans
    /// several 5 MiB parts; `storage_keys` are extra `[storage]` lines.
    fn new(bulk_mib: u32, storage_keys: &str) -> Bed {
        let base = BedBase::s3("dr-s3-faults-", "faults");
        create_seeded(&base.cluster, "app");
        if bulk_mib > 0 {
            seed_incompressible(&base.cluster, "app", bulk_mib);
        }
        let garage = base.garage.as_ref().expect("s3 bed");
        let garage_port: u16 = garage
            .endpoint()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("garage endpoint has a port");
        let proxy = FaultProxy::start(garage_port, Fault::None);
        let storage = Storage::S3 {
            bucket: garage.bucket().to_string(),
            prefix: "faults".into(),
            endpoint: proxy.endpoint(),
            region: Garage::REGION.into(),
        };
        // The first lines land in the [storage] table, which write_config leaves open.
        let part_size = if storage_keys.contains("part_size_mib") {
            ""
        } else {
            "part_size_mib = 5\n"
        };
        let body = format!("{part_size}{storage_keys}\n")
            + &encryption_toml(&[&base.keys.recipient], Some(&base.keys.identity))
            + &database_toml("app", &base.cluster.url("app"), None);
        let config = write_config(base.dir(), &storage, &body);
        fs::create_dir(base.dir().join("staging")).expect("create staging dir");
        Bed {
            base,
            proxy,
            config,
        }
    }

    fn dir(&self) -> &Path {
        self.base.dir()
    }

    /// `dr --config <config>` with Garage's credentials and the cluster's password.
    fn dr(&self) -> Dr {
        self.base
            .dr(&self.config)
            .env("PGPASSWORD", self.base.cluster.password())
    }

    fn backup(&self) -> DrOutput {
        self.dr().args(["backup", "--database", "app"]).run()
    }

    /// The repository straight from Garage, not through the proxy.
    fn repo(&self) -> Repo {
        self.base.repo()
    }

    fn restore_into(&self, db: &str, jobs: &str) -> DrOutput {
        self.dr()
            .args(["restore", "--database", "app", "--staging-dir"])
            .arg(self.dir().join("staging"))
            .args(["--target", &self.base.cluster.url(db)])
            .args(["--create", "--jobs", jobs])
            .run()
    }

    fn assert_same_as_source(&self, db: &str) {
        assert_eq!(
            table_hashes(&self.base.cluster, "app"),
            table_hashes(&self.base.cluster, db),
            "the restored database {db} differs from the source"
        );
    }

    /// A failed backup left nothing: no manifest, no object, no open multipart upload.
    fn assert_nothing_committed(&self, out: &DrOutput) {
        eprintln!("dr's error output:\n{}", out.stderr);
        assert!(
            !out.status.success(),
            "the backup succeeded:\n{}",
            out.stderr
        );
        assert!(out.stdout_lines().is_empty(), "ids printed: {}", out.stdout);
        let repo = self.repo();
        assert!(
            repo.committed_ids(ENV, "app").is_empty(),
            "a manifest was written: {:?}",
            repo.keys()
        );
        assert!(
            repo.pending_uploads().is_empty(),
            "multipart uploads left open: {:?}",
            repo.pending_uploads()
        );
    }
}

#[test]
fn backup_retries_503s_and_succeeds() {
    let bed = Bed::new(0, "");
    bed.proxy.set(Fault::Unavailable { requests: 3 });
    let id = bed.backup().assert_one_backup_id();
    assert_eq!(bed.proxy.injected(), 3, "the 503s were not all served");
    assert_eq!(bed.repo().committed_ids(ENV, "app"), vec![id]);
    bed.dr()
        .args(["verify", "--database", "app"])
        .run()
        .assert_success();
}

#[test]
fn backup_survives_connections_reset_mid_upload() {
    let bed = Bed::new(12, "");
    bed.proxy.set(Fault::ResetAfter {
        direction: Direction::ToUpstream,
        after: 2 * MIB,
        times: 2,
    });
    let id = bed.backup().assert_one_backup_id();
    assert_eq!(bed.proxy.injected(), 2, "the resets did not happen");
    assert_eq!(bed.repo().committed_ids(ENV, "app"), vec![id]);
    assert!(bed.repo().pending_uploads().is_empty());
    bed.dr()
        .args(["verify", "--database", "app"])
        .run()
        .assert_success();
}

#[test]
fn backup_that_keeps_getting_reset_aborts_cleanly() {
    let bed = Bed::new(12, "");
    // Every UploadPart is cut; the small requests (create, abort) still get through.
    bed.proxy.set(Fault::ResetAfter {
        direction: Direction::ToUpstream,
        after: 2 * MIB,
        times: 1000,
    });
    let out = bed.backup();
    assert!(
        bed.proxy.injected() >= 5,
        "too few resets: {}",
        bed.proxy.injected()
    );
    bed.assert_nothing_committed(&out);
    out.assert_failure_mentions(&["upload part"]);
}

#[test]
fn corrupted_upload_is_rejected_and_never_commits() {
    let bed = Bed::new(8, "");
    bed.proxy.set(Fault::CorruptUpload {
        min_body: MIB,
        times: 1000,
    });
    let out = bed.backup();
    assert!(bed.proxy.injected() >= 1, "no body was corrupted");
    bed.assert_nothing_committed(&out);
    out.assert_failure_mentions(&["corrupted in transit"]);
}

#[test]
fn every_write_carries_content_md5_and_no_store_specific_checksum() {
    // Content-MD5 is the one integrity header every S3-compatible store checks; the SDK's
    // CRC32 / x-amz-checksum-* headers are refused by some stores, so none may be sent.
    let bed = Bed::new(8, "");
    bed.backup().assert_one_backup_id();
    let heads = bed.proxy.request_heads();
    let writes: Vec<&String> = heads
        .iter()
        .filter(|h| h.starts_with("put ") && !h.contains("x-amz-copy-source"))
        .collect();
    let parts = writes.iter().filter(|h| h.contains("partnumber=")).count();
    assert!(parts >= 2, "the backup did not upload in parts: {heads:#?}");
    assert!(
        writes.len() > parts,
        "no single-request PUT (manifest, globals): {heads:#?}"
    );
    for head in &writes {
        let request_line = head.lines().next().unwrap_or_default();
        assert!(
            head.lines().any(|l| l.starts_with("content-md5:")),
            "no Content-MD5 on {request_line}"
        );
        for forbidden in ["x-amz-checksum-", "x-amz-sdk-checksum-algorithm"] {
            assert!(
                !head.contains(forbidden),
                "{request_line} carries {forbidden}:\n{head}"
            );
        }
    }
}

#[test]
fn frozen_endpoint_fails_within_the_idle_timeout_with_no_manifest() {
    let bed = Bed::new(0, "idle_timeout_secs = 3");
    bed.proxy.set(Fault::Stall);
    let started = Instant::now();
    let out = bed.backup();
    let took = started.elapsed();
    eprintln!("dr gave up after {took:?}:\n{}", out.stderr);
    out.assert_failure_mentions(&["stopped responding", &bed.proxy.endpoint()]);
    // One idle timeout for the request, one for the abort attempt, plus start-up.
    assert!(took < Duration::from_secs(40), "took {took:?}");
    bed.proxy.set(Fault::None);
    bed.assert_nothing_committed(&out);
}

#[test]
fn endpoint_freezing_mid_upload_fails_fast_and_commits_nothing() {
    let bed = Bed::new(24, "idle_timeout_secs = 3");
    bed.proxy.set(Fault::Throttle {
        to_upstream: Some(2 * MIB as usize),
        to_client: None,
    });
    let child = bed.dr().args(["backup", "--database", "app"]).spawn();
    let repo = bed.repo();
    let seen = dr_tests::wait_until(Duration::from_secs(60), || {
        !repo.pending_uploads().is_empty()
    });
    assert!(seen, "the multipart upload never started");
    std::thread::sleep(Duration::from_secs(1));
    bed.proxy.set(Fault::Stall);
    let frozen = Instant::now();
    let out = dr_tests::wait_with_timeout(child, Duration::from_secs(300));
    let took = frozen.elapsed();
    eprintln!("dr gave up {took:?} after the freeze:\n{}", out.stderr);
    out.assert_failure_mentions(&["stopped responding"]);
    assert!(took < Duration::from_secs(40), "took {took:?}");
    bed.proxy.set(Fault::None);
    assert!(
        repo.committed_ids(ENV, "app").is_empty(),
        "{:?}",
        repo.keys()
    );
}

#[test]
fn slow_but_moving_transfers_outlast_the_idle_timeout() {
    // 12 s without progress fails a request, while the first 16 MiB part takes about 16 s
    // at 1 MiB/s: a per-request deadline of 12 s would fail it. The idle limit must exceed
    // the time the link needs to drain the OS's socket send buffer (up to 4 MiB, tcp_wmem)
    // after the last byte was handed over: 4 s here (README, [storage]), and twice that
    // when a loaded host starves the throttling proxy (an 8 s limit failed so in CI).
    let bed = Bed::new(16, "idle_timeout_secs = 12\npart_size_mib = 16");
    bed.proxy.set(Fault::Throttle {
        to_upstream: Some(MIB as usize),
        to_client: Some(MIB as usize),
    });
    let started = Instant::now();
    let id = bed.backup().assert_one_backup_id();
    let took = started.elapsed();
    assert!(
        took > Duration::from_secs(16),
        "the link was not slow: {took:?}"
    );
    bed.dr()
        .args(["verify", "--database", "app"])
        .run()
        .assert_success();
    assert_eq!(bed.repo().committed_ids(ENV, "app"), vec![id]);
}

#[test]
fn verify_and_restore_resume_after_connection_resets() {
    let bed = Bed::new(16, "");
    let id = bed.backup().assert_one_backup_id();

    // Each download connection is cut after 3 MiB; three cuts, then the link is good.
    bed.proxy.set(Fault::ResetAfter {
        direction: Direction::ToClient,
        after: 3 * MIB,
        times: 3,
    });
    let out = bed.dr().args(["verify", "--database", "app"]).run();
    out.assert_success();
    assert_eq!(bed.proxy.injected(), 3, "verify did not meet the resets");
    eprintln!("verify:\n{}{}", out.stdout, out.stderr);

    for (db, jobs) in [("restored_streamed", "1"), ("restored_staged", "2")] {
        let before = bed.proxy.injected();
        bed.proxy.set(Fault::ResetAfter {
            direction: Direction::ToClient,
            after: 3 * MIB,
            times: 2,
        });
        bed.restore_into(db, jobs).assert_success();
        assert_eq!(
            bed.proxy.injected(),
            before + 2,
            "restore did not meet the resets"
        );
        bed.assert_same_as_source(db);
    }
    assert_eq!(bed.repo().committed_ids(ENV, "app"), vec![id]);
}

#[test]
fn download_that_never_gets_through_fails_with_the_cause() {
    let bed = Bed::new(8, "");
    bed.backup().assert_one_backup_id();
    // The download is cut after 3 MiB; from then on every connection is cut after its
    // first byte, so no resume makes progress.
    bed.proxy.set(Fault::ResetAfter {
        direction: Direction::ToClient,
        after: 3 * MIB,
        times: 1,
    });
    let child = bed.dr().args(["verify", "--database", "app"]).spawn();
    let cut = dr_tests::wait_until(Duration::from_secs(60), || bed.proxy.injected() == 1);
    assert!(cut, "the download was never cut");
    bed.proxy.set(Fault::ResetAfter {
        direction: Direction::ToClient,
        after: 1,
        times: 1_000_000,
    });
    let started = Instant::now();
    let out = dr_tests::wait_with_timeout(child, Duration::from_secs(600));
    eprintln!(
        "gave up after {:?}:\n{}{}",
        started.elapsed(),
        out.stdout,
        out.stderr
    );
    assert!(!out.status.success(), "verify passed without the data");
    let said = out.both();
    for needle in [
        "data.dump.zst.age FAILED",
        "failed at byte",
        "after 5 attempts to resume",
        "Connection reset by peer",
    ] {
        assert!(said.contains(needle), "{needle:?} missing:\n{said}");
    }
}

#[test]
fn no_credentials_says_where_they_were_looked_for() {
    let bed = Bed::new(0, "");
    let home = bed.dir().join("empty-home");
    fs::create_dir(&home).unwrap();
    // Dr drops every AWS_* variable; HOME has no ~/.aws; instance metadata is unreachable.
    let out = Dr::new(&bed.config)
        .env("HOME", &home)
        .env("PGPASSWORD", bed.base.cluster.password())
        .args(["backup", "--database", "app"])
        .run();
    eprintln!("{}", out.stderr);
    out.assert_failure_mentions(&[
        "no AWS credentials found",
        "AWS_ACCESS_KEY_ID",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "instance metadata",
    ]);
    assert!(
        !out.stderr.contains("169.254.169.254"),
        "the instance-metadata dump is back:\n{}",
        out.stderr
    );
}

#[test]
fn storage_credentials_in_urls_are_never_printed() {
    let bed = Bed::new(0, "");
    let secret = "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY";
    let garage = bed.base.garage.as_ref().unwrap();
    let text = fs::read_to_string(&bed.config).unwrap();
    let endpoint = bed.proxy.endpoint();
    let cases = [
        text.replace(
            &format!("s3://{}/", garage.bucket()),
            &format!("s3://AKIAEXAMPLE:{secret}@{}/", garage.bucket()),
        ),
        text.replace(
            &endpoint,
            &endpoint.replace("http://", &format!("http://AKIAEXAMPLE:{secret}@")),
        ),
    ];
    for (i, case) in cases.iter().enumerate() {
        assert_ne!(case, &text, "case {i} changed nothing");
        let config = bed.dir().join(format!("leaky-{i}.toml"));
        fs::write(&config, case).unwrap();
        for args in [
            &["config", "check"][..],
            &["backup", "--database", "app"],
            &["list"],
            &["verify", "--database", "app"],
        ] {
            let out = bed
                .base
                .dr(&config)
                .env("PGPASSWORD", bed.base.cluster.password())
                .args(args)
                .run();
            assert!(!out.status.success(), "case {i} {args:?} succeeded");
            assert!(
                !out.both().contains(secret),
                "case {i} {args:?} printed the secret:\n{}",
                out.both()
            );
        }
    }
}
