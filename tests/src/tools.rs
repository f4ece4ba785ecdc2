//! Keys, stock-tool restores and small file helpers.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::dr::Dr;
use crate::pg::{pg_bindir, PgCluster};

/// An age identity file and its public recipient.
#[derive(Clone, Debug)]
pub struct Keypair {
    pub identity: PathBuf,
    pub recipient: String,
}

/// Creates `dir/identity.txt` with `dr keygen --output` and returns it with the recipient
/// `dr` printed (the `age1...` line of its stdout).
pub fn keygen(dir: &Path) -> Keypair {
    let identity = dir.join("identity.txt");
    let out = Dr::without_config()
        .args(["keygen", "--output"])
        .arg(&identity)
        .run();
    out.assert_success();
    let recipient = out
        .stdout_lines()
        .into_iter()
        .find(|line| line.starts_with("age1"))
        .unwrap_or_else(|| panic!("dr keygen printed no age1 recipient:\n{}", out.stdout));
    assert!(
        identity.is_file(),
        "dr keygen did not write {}",
        identity.display()
    );
    Keypair {
        identity,
        recipient,
    }
}

/// Restores `data_object` (as stored by `dr`) into the new database `new_db` using only
/// stock tools: `age -d -i identity data | zstd -d | pg_restore --no-owner -d new_db`, in
/// bash with `pipefail` so a failure in any stage fails the restore. This is the escape
/// hatch operators have without `dr`. Panics with the pipeline's stderr on failure.
pub fn stock_restore(identity: &Path, data_object: &Path, cluster: &PgCluster, new_db: &str) {
    cluster.create_db(new_db);
    let pg_restore = pg_bindir().join("pg_restore");
    let out = cluster
        .client_command_for(Path::new("bash"))
        .arg("-c")
        .arg(r#"set -euo pipefail; age -d -i "$1" "$2" | zstd -d | "$3" --no-owner --exit-on-error -d "$4""#)
        .arg("stock-restore")
        .arg(identity)
        .arg(data_object)
        .arg(&pg_restore)
        .arg(new_db)
        .stdin(Stdio::null())
        .output()
        .expect("run stock restore pipeline");
    assert!(
        out.status.success(),
        "stock restore of {} failed ({}):\n{}",
        data_object.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Decrypts and decompresses a stored object with the stock `age` and `zstd` CLIs and
/// returns the plaintext. Panics on failure.
pub fn decrypt_to_bytes(identity: &Path, object: &Path) -> Vec<u8> {
    let out = Command::new("bash")
        .arg("-c")
        .arg(r#"set -euo pipefail; age -d -i "$1" "$2" | zstd -d"#)
        .arg("decrypt")
        .arg(identity)
        .arg(object)
        .stdin(Stdio::null())
        .output()
        .expect("run age | zstd");
    assert!(
        out.status.success(),
        "age -d | zstd -d of {} failed ({}):\n{}",
        object.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Writes an executable script (mode 0755), e.g. a wrapper that shadows `pg_dump`.
pub fn write_script(path: &Path, body: &str) {
    fs::write(path, body).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// Writes a secret (e.g. a password file) readable only by its owner (mode 0600).
pub fn write_secret_file(path: &Path, secret: &str) {
    fs::write(path, secret).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// A directory of PostgreSQL client tools to put first on `dr`'s PATH: every tool of the
/// real bindir as a symlink, except `wrapped`, which are replaced by scripts. `dr` takes
/// every client tool from the directory where it found `pg_dump`, so the directory must be
/// complete. It is `parent/pgbin`.
pub fn tool_dir(parent: &Path, wrapped: &[(&str, String)]) -> PathBuf {
    let dir = parent.join("pgbin");
    fs::create_dir_all(&dir).expect("create tool dir");
    for entry in fs::read_dir(pg_bindir()).expect("read pg bindir") {
        let entry = entry.expect("bindir entry");
        let name = entry.file_name();
        if wrapped.iter().all(|(w, _)| name.to_str() != Some(w)) {
            std::os::unix::fs::symlink(entry.path(), dir.join(&name)).expect("symlink tool");
        }
    }
    for (name, script) in wrapped {
        write_script(&dir.join(name), script);
    }
    dir
}
