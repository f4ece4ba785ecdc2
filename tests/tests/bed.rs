//! Tests of the test bed itself: if these fail, the end-to-end tests prove nothing.

use dr_tests::{create_seeded, table_hashes, Garage, PgCluster, SEED_BIG_ROWS};

#[test]
fn pg_cluster_answers_queries_over_tcp_with_its_password() {
    let cluster = PgCluster::start();
    assert_eq!(cluster.psql("postgres", "select 1"), "1");
    assert_eq!(
        cluster.psql("postgres", "show server_version_num")[..2].to_string(),
        "15"
    );
    assert!(cluster
        .url("app")
        .ends_with(&format!(":{}/app", cluster.port())));
    assert!(!cluster.url("app").contains(cluster.password()));
}

#[test]
fn pg_cluster_rejects_a_wrong_password() {
    let cluster = PgCluster::start();
    let out = cluster
        .client_command("psql")
        .env("PGPASSWORD", "not-the-password")
        .args(["-XAtq", "-d", "postgres", "-c", "select 1"])
        .output()
        .expect("run psql");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("password authentication failed"),
        "unexpected psql error: {stderr}"
    );
}

#[test]
fn seeded_databases_hash_alike_and_differ_after_a_change() {
    let cluster = PgCluster::start();
    create_seeded(&cluster, "one");
    create_seeded(&cluster, "two");
    let one = table_hashes(&cluster, "one");
    assert_eq!(one, table_hashes(&cluster, "two"));
    assert!(one["public.events"].starts_with(&format!("{SEED_BIG_ROWS}:")));
    assert!(one["<large objects>"].starts_with("3:"));
    assert_eq!(one.len(), 7, "tables: {:?}", one.keys());

    cluster.psql("two", "UPDATE blobs SET payload = '\\x00' WHERE id = 7");
    assert_ne!(one, table_hashes(&cluster, "two"));
}

#[test]
fn garage_stores_lists_and_returns_objects() {
    let garage = Garage::start();
    let s3 = garage.client();
    let body: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    s3.put(garage.bucket(), "bed/check/object.bin", body.clone());
    assert_eq!(s3.get(garage.bucket(), "bed/check/object.bin"), body);
    assert_eq!(
        s3.list(garage.bucket(), "bed/"),
        vec!["bed/check/object.bin".to_string()]
    );
    assert!(s3.multipart_uploads(garage.bucket(), "").is_empty());
    assert!(garage
        .env()
        .iter()
        .any(|(k, v)| k == "AWS_REGION" && v == "garage"));
}

#[test]
fn garage_keeps_objects_across_a_restart() {
    let mut garage = Garage::start();
    garage
        .client()
        .put(garage.bucket(), "kept.txt", b"still here".to_vec());
    garage.stop();
    assert!(garage.client().try_list(garage.bucket(), "").is_err());
    garage.restart();
    assert_eq!(
        garage.client().get(garage.bucket(), "kept.txt"),
        b"still here"
    );
}
