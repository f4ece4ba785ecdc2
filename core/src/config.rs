//! Configuration: parsed once from TOML into typed, validated structs.
//!
//! Every value that can be wrong (durations, cron expressions, URLs, recipients) has its own
//! type that validates while deserializing, so an error carries the line it came from and
//! nothing downstream re-parses strings.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use jiff::{Span, Timestamp, Zoned};
use serde::Deserialize;

use crate::keys::Recipients;
use crate::pg::ConnUrl;
use crate::storage::StorageUrl;

/// Where `dr` looks for its configuration when neither `--config` nor `DR_CONFIG` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/dr/agent.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}, line {line}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Names this deployment in the repository layout (`<prefix>/<environment>/...`).
    pub environment: Name,
    pub storage: StorageConfig,
    pub encryption: EncryptionConfig,
    #[serde(default)]
    pub compression: CompressionConfig,
    #[serde(default)]
    pub agent: AgentConfig,
    #[serde(default)]
    pub databases: Vec<DatabaseConfig>,
    /// Webhooks told about failures and RPO breaches.
    #[serde(default)]
    pub notify: Vec<NotifyConfig>,
    /// More repositories (another region, account or disk) that every committed backup and
    /// change segment is copied to, byte for byte.
    #[serde(default)]
    pub copies: Vec<CopyConfig>,
    /// Directory trees (uploads, documents) backed up like databases.
    #[serde(default)]
    pub directories: Vec<DirectoryConfig>,
}

/// `[[directories]]`: a tree of files backed up as a tar through the same pipeline.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectoryConfig {
    /// Names it in the repository (`<env>/<name>/backups/...`); not a database's name.
    pub name: Name,
    /// The tree's root, absolute; or else `source`.
    pub path: Option<PathBuf>,
    /// An S3 prefix whose objects are the tree (uploads an app already keeps in a bucket):
    /// `source = "s3://bucket/prefix"` (AWS, the default endpoint) or a table like
    /// `[storage]` (`url`, `endpoint`, `region`, `path_style`). Read only, never written.
    #[serde(default, deserialize_with = "source_storage")]
    pub source: Option<StorageConfig>,
    pub rpo: Option<Duration>,
    #[serde(default)]
    pub schedules: Vec<ScheduleConfig>,
    /// Skip (and count) files that cannot be read instead of failing the backup.
    #[serde(default)]
    pub skip_unreadable: bool,
}

/// What a `[[directories]]` entry reads.
#[derive(Debug, Clone, Copy)]
pub enum DirectorySource<'a> {
    Path(&'a Path),
    S3(&'a StorageConfig),
}

impl DirectoryConfig {
    /// Exactly one of `path` and `source` is set (checked at load).
    pub fn source(&self) -> DirectorySource<'_> {
        match (&self.path, &self.source) {
            (_, Some(s)) => DirectorySource::S3(s),
            (Some(p), None) => DirectorySource::Path(p),
            (None, None) => unreachable!("validated: a directory has a path or a source"),
        }
    }
}

/// `source = "s3://…"`, or a table with `[storage]`'s fields.
fn source_storage<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<StorageConfig>, D::Error> {
    struct Source;
    impl<'de> serde::de::Visitor<'de> for Source {
        type Value = StorageConfig;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(
                "an s3:// URL, or a table like [storage] (url, endpoint, region, path_style)",
            )
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<StorageConfig, E> {
            Ok(StorageConfig::at(
                StorageUrl::try_from(text.to_string()).map_err(E::custom)?,
            ))
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            map: A,
        ) -> Result<StorageConfig, A::Error> {
            StorageConfig::deserialize(serde::de::value::MapAccessDeserializer::new(map))
        }
    }
    d.deserialize_any(Source).map(Some)
}

/// `[[copies]]`: a repository the agent copies the primary's stored objects to.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyConfig {
    /// Names the copy in metrics (`repository="…"`), `dr status` and `--repository`.
    pub name: Name,
    /// Where it is, exactly like `[storage]`.
    pub storage: StorageConfig,
    /// Retention here, per class, where it differs from the class's `keep`.
    #[serde(default)]
    pub keep: BTreeMap<String, Duration>,
    /// How often the agent looks for anything the copy misses (it also copies each backup as
    /// soon as it is committed).
    #[serde(default = "default_copy_interval")]
    pub interval_seconds: u64,
}

fn default_copy_interval() -> u64 {
    60
}

/// The name metrics and `--repository` give the `[storage]` repository.
pub const PRIMARY: &str = "primary";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// The webhook URL; treat it as a secret (Slack's carry a token), it is never logged.
    pub url: String,
    #[serde(default)]
    pub format: NotifyFormat,
    /// Which events to send (default: all).
    pub events: Option<Vec<NotifyEvent>>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NotifyFormat {
    /// A JSON object with the event's fields.
    #[default]
    Json,
    /// `{"text": "..."}`, accepted by Slack, Mattermost and Rocket.Chat incoming webhooks.
    Slack,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyEvent {
    BackupFailed,
    RpoBreach,
    RpoRecovered,
    DrillFailed,
    /// A continuous database's slot or publication puts capture or the source at risk.
    ContinuousAtRisk,
    Test,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    pub url: StorageUrl,
    /// Custom S3 endpoint (MinIO, Garage, Ceph RGW, R2, ...).
    pub endpoint: Option<String>,
    pub region: Option<String>,
    #[serde(default)]
    pub path_style: bool,
    /// Multipart part size in MiB; S3 requires at least 5.
    #[serde(default = "default_part_size_mib")]
    pub part_size_mib: usize,
    /// Parts uploaded concurrently; memory is about `part size × (max_in_flight + 3)`, the
    /// part size growing with the object (see `pipeline::parts`).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// An S3 request that makes no progress (nothing sent, nothing received) for this many
    /// seconds fails; a slow transfer that moves never does.
    #[serde(default = "default_idle_timeout_secs")]
    pub idle_timeout_secs: u64,
    /// S3 Object Lock: every stored object is locked until its backup's longest `keep` (plus
    /// a day) has passed. The bucket must have Object Lock enabled.
    pub object_lock: Option<crate::storage::LockMode>,
}

impl StorageConfig {
    /// `url` with every other setting at its default.
    pub fn at(url: StorageUrl) -> StorageConfig {
        StorageConfig {
            url,
            endpoint: None,
            region: None,
            path_style: false,
            part_size_mib: default_part_size_mib(),
            max_in_flight: default_max_in_flight(),
            idle_timeout_secs: default_idle_timeout_secs(),
            object_lock: None,
        }
    }
}

fn default_idle_timeout_secs() -> u64 {
    60
}

/// 8 MiB: with the default 2 in flight the parts stay about 40 MiB up to 7.8 GiB stored
/// (16 MiB parts would be 80 MiB, past the 64 MiB the agent aims for).
fn default_part_size_mib() -> usize {
    8
}
fn default_max_in_flight() -> usize {
    2
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionConfig {
    #[serde(default)]
    pub recipients: Vec<String>,
    pub recipients_file: Option<PathBuf>,
    /// Only needed where restores and drills run; the backup host holds public keys only.
    pub identity_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressionConfig {
    #[serde(default = "default_level")]
    pub level: i32,
    /// zstd worker threads; 0 means one per core, at most 4 (memory grows with threads).
    #[serde(default)]
    pub threads: u32,
}

fn default_level() -> i32 {
    3
}

impl Default for CompressionConfig {
    fn default() -> Self {
        Self {
            level: default_level(),
            threads: 0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// IANA time zone the cron schedules are read in.
    #[serde(default = "default_timezone")]
    pub timezone: TimeZone,
    /// Address of the HTTP endpoints `/healthz` and `/metrics`.
    #[serde(default = "default_listen")]
    pub listen: std::net::SocketAddr,
    /// Backups of different databases that may run at once.
    #[serde(default = "default_max_jobs")]
    pub max_concurrent_jobs: usize,
    /// The longest a backup (scheduled or `dr backup`) may run before it is cancelled and
    /// counted as failed. Prune also relies on it: an unmanifested object whose backup id is
    /// older than this cannot belong to a backup in flight.
    #[serde(default = "default_job_timeout")]
    pub job_timeout: Duration,
    /// How long `pg_dump` waits for a table lock before it gives up
    /// (`--lock-wait-timeout`); `[[databases]] lock_wait_timeout` overrides it.
    #[serde(default = "default_lock_wait_timeout")]
    pub lock_wait_timeout: Duration,
    /// The read-only status page at `/` on `listen`, next to `/metrics`.
    #[serde(default = "default_status_page")]
    pub status_page: bool,
}

fn default_listen() -> std::net::SocketAddr {
    ([127, 0, 0, 1], 9847).into()
}
fn default_max_jobs() -> usize {
    2
}
fn default_job_timeout() -> Duration {
    Duration::try_from("24h".to_string()).expect("valid default")
}
fn default_lock_wait_timeout() -> Duration {
    Duration::try_from("10m".to_string()).expect("valid default")
}

fn default_status_page() -> bool {
    true
}

fn default_timezone() -> TimeZone {
    TimeZone(jiff::tz::TimeZone::UTC, "UTC".into())
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            timezone: default_timezone(),
            listen: default_listen(),
            max_concurrent_jobs: default_max_jobs(),
            job_timeout: default_job_timeout(),
            lock_wait_timeout: default_lock_wait_timeout(),
            status_page: default_status_page(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    pub name: Name,
    pub url: ConnUrl,
    /// A file holding the password; it must not be world-readable.
    pub password_file: Option<PathBuf>,
    pub rpo: Option<Duration>,
    pub rto: Option<Duration>,
    /// Overrides `[agent] lock_wait_timeout` for this database.
    pub lock_wait_timeout: Option<Duration>,
    #[serde(default)]
    pub schedules: Vec<ScheduleConfig>,
    /// Restore drills; also makes backups record exact row counts for them.
    pub drill: Option<DrillConfig>,
    /// Continuous capture of committed changes through logical decoding.
    pub continuous: Option<ContinuousConfig>,
    /// Concurrent `pg_dump` data archives per backup, from one snapshot (1 = one archive);
    /// default min(4, cores).
    pub dump_jobs: Option<u32>,
    /// Databases smaller than this (tables, TOAST included) stay one archive: K extra
    /// `pg_dump` start-ups cost more than a split saves.
    #[serde(default = "default_split_min_mib")]
    pub split_min_mib: u64,
}

fn default_split_min_mib() -> u64 {
    256
}

/// `[databases.continuous]`: the publication and slot dr reads the database's changes from.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContinuousConfig {
    /// The logical replication slot; default `dr_<database>`.
    pub slot: Option<SlotName>,
    /// The `FOR ALL TABLES` publication; default the slot's name.
    pub publication: Option<SlotName>,
    /// A change segment closes after this long...
    #[serde(default = "default_segment_seconds")]
    pub segment_seconds: u64,
    /// ...or once it holds this much (uncompressed).
    #[serde(default = "default_segment_max_mib")]
    pub segment_max_mib: u64,
    /// Alert when the slot holds back more WAL than this on the source.
    #[serde(default = "default_slot_retained_alert_mib")]
    pub slot_retained_alert_mib: u64,
    /// Tables without a primary key the operator chose to publish with `REPLICA IDENTITY
    /// FULL` (dr sets it at setup), written as `dr continuous setup` lists them
    /// (`schema.table`, quoted as PostgreSQL's `format('%I.%I')` quotes).
    #[serde(default)]
    pub replica_identity_full: Vec<String>,
}

fn default_segment_seconds() -> u64 {
    30
}
fn default_segment_max_mib() -> u64 {
    64
}
fn default_slot_retained_alert_mib() -> u64 {
    1024
}

impl DatabaseConfig {
    /// The backup classes this database's schedules produce.
    pub fn classes(&self) -> impl Iterator<Item = &str> {
        self.schedules.iter().map(|s| s.class.as_str())
    }

    /// The data archives a backup of this database is split into (before the size check).
    pub fn dump_jobs(&self) -> u32 {
        self.dump_jobs.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, |n| n.get().min(4) as u32)
        })
    }

    /// The slot and publication names of a continuous database.
    pub fn continuous_names(&self) -> Option<(SlotName, SlotName)> {
        let c = self.continuous.as_ref()?;
        let slot = c
            .slot
            .clone()
            .unwrap_or_else(|| SlotName::for_database(self.name.as_str()));
        let publication = c.publication.clone().unwrap_or_else(|| slot.clone());
        Some((slot, publication))
    }
}

/// A replication slot or publication name: what PostgreSQL accepts for a slot (lower-case
/// letters, digits and `_`, at most 63), so it never needs quoting.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct SlotName(String);

impl SlotName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `dr_<database>`, with anything a slot name cannot hold turned into `_`.
    pub fn for_database(database: &str) -> SlotName {
        let mut name: String = format!("dr_{database}")
            .chars()
            .map(|c| match c {
                'a'..='z' | '0'..='9' | '_' => c,
                'A'..='Z' => c.to_ascii_lowercase(),
                _ => '_',
            })
            .collect();
        name.truncate(63);
        SlotName(name)
    }
}

impl TryFrom<String> for SlotName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if ok {
            Ok(SlotName(s))
        } else {
            Err(format!(
                "invalid slot or publication name `{s}`: use 1 to 63 characters from lower-case letters, digits and `_`"
            ))
        }
    }
}

impl fmt::Display for SlotName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillConfig {
    pub cron: Option<CronExpr>,
    /// `ephemeral` (a throwaway local cluster) or a scratch server's URL.
    #[serde(default = "default_drill_target")]
    pub target: DrillTarget,
    /// SQL expressions that must return true on the restored database.
    #[serde(default)]
    pub checks: Vec<String>,
    #[serde(default)]
    pub sample: DrillSample,
    /// How many recent backups `random-recent` picks from.
    #[serde(default = "default_sample_size")]
    pub sample_size: usize,
    /// Allow a scratch server that is the backed-up server itself (drills still only touch
    /// databases they created).
    #[serde(default)]
    pub allow_same_server: bool,
    /// Unprivileged user an ephemeral cluster runs as when dr runs as root.
    #[serde(default = "default_run_as")]
    pub run_as: String,
    /// A file holding the scratch server's password.
    pub password_file: Option<PathBuf>,
    /// An ephemeral cluster's durability: `full` (PostgreSQL's defaults, so the RTO is what
    /// an incident would see) or `off` (no fsync, full_page_writes or synchronous_commit:
    /// faster, and the report says the RTO is not representative).
    #[serde(default)]
    pub durability: DrillDurability,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DrillDurability {
    #[default]
    Full,
    Off,
}

fn default_drill_target() -> DrillTarget {
    DrillTarget::Ephemeral
}
fn default_sample_size() -> usize {
    5
}
fn default_run_as() -> String {
    "postgres".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "String")]
pub enum DrillTarget {
    Ephemeral,
    Server(ConnUrl),
}

impl TryFrom<String> for DrillTarget {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s == "ephemeral" {
            return Ok(DrillTarget::Ephemeral);
        }
        ConnUrl::try_from(s)
            .map(DrillTarget::Server)
            .map_err(|e| format!("drill target must be \"ephemeral\" or a postgres:// URL: {e}"))
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DrillSample {
    #[default]
    Latest,
    RandomRecent,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    pub class: Name,
    pub cron: CronExpr,
    pub keep: Duration,
}

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses `text`; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1))
                .unwrap_or(1);
            // The TOML snippet is left out on purpose: the line may hold a password.
            let line = if e.span().is_some_and(|s| text[..s.start].ends_with('\n')) {
                line + 1
            } else {
                line
            };
            ConfigError::Parse {
                path: path.to_owned(),
                line,
                message: e.message().trim().to_string(),
            }
        })?;
        let mut config = config;
        config.expand_credentials(path)?;
        config.validate(path)?;
        Ok(config)
    }

    /// Expands `$CREDENTIALS_DIRECTORY` (systemd's `LoadCredential=`) in secret file paths.
    fn expand_credentials(&mut self, path: &Path) -> Result<(), ConfigError> {
        let dir = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        let expand = |p: &mut Option<PathBuf>| -> Result<(), ConfigError> {
            let Some(current) = p.as_ref() else {
                return Ok(());
            };
            let text = current.to_string_lossy();
            let rest = text
                .strip_prefix("$CREDENTIALS_DIRECTORY/")
                .or_else(|| text.strip_prefix("${CREDENTIALS_DIRECTORY}/"));
            let Some(rest) = rest else {
                return Ok(());
            };
            let dir = dir.as_ref().ok_or_else(|| ConfigError::Invalid {
                path: path.to_owned(),
                message: format!(
                    "`{text}` uses $CREDENTIALS_DIRECTORY, which is not set: run under systemd with LoadCredential=, or give the full path"
                ),
            })?;
            *p = Some(dir.join(rest));
            Ok(())
        };
        expand(&mut self.encryption.identity_file)?;
        expand(&mut self.encryption.recipients_file)?;
        for db in &mut self.databases {
            expand(&mut db.password_file)?;
            if let Some(drill) = &mut db.drill {
                expand(&mut drill.password_file)?;
            }
        }
        Ok(())
    }

    /// A directory's S3 source: S3, never locked, and not a repository's own objects (each
    /// backup would hold the ones before it).
    fn check_source(&self, name: &str, source: &StorageConfig) -> Result<(), String> {
        let StorageUrl::S3 { bucket, prefix } = &source.url else {
            return Err(format!(
                "directory `{name}`: source {} is not an s3:// URL; a local tree is `path = \"/srv/uploads\"`",
                source.url
            ));
        };
        if source.object_lock.is_some() {
            return Err(format!(
                "directory `{name}`: object_lock on a source has no effect (dr only reads it); remove it"
            ));
        }
        let nested = |a: &str, b: &str| {
            let (a, b) = (a.trim_matches('/'), b.trim_matches('/'));
            a.is_empty()
                || b.is_empty()
                || a == b
                || b.starts_with(&format!("{a}/"))
                || a.starts_with(&format!("{b}/"))
        };
        let repositories = std::iter::once(("[storage]".to_string(), &self.storage)).chain(
            self.copies
                .iter()
                .map(|c| (format!("copy `{}`", c.name), &c.storage)),
        );
        // No endpoint is AWS's; a trailing slash or letter case names the same store.
        let store = |endpoint: &Option<String>| match endpoint {
            Some(e) if !e.contains("amazonaws.com") => e.trim_end_matches('/').to_lowercase(),
            _ => "aws".to_string(),
        };
        for (owner, repo) in repositories {
            if let StorageUrl::S3 {
                bucket: b,
                prefix: p,
            } = &repo.url
            {
                if b == bucket
                    && store(&repo.endpoint) == store(&source.endpoint)
                    && nested(p, prefix)
                {
                    return Err(format!(
                        "directory `{name}`: source {} overlaps {owner} ({}): each backup would contain the backups before it; point source at the uploads' own prefix",
                        source.url, repo.url
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        if self.encryption.recipients_file.is_some() && !self.encryption.recipients.is_empty() {
            return Err(invalid(
                "[encryption] sets both `recipients` and `recipients_file`; keep one".into(),
            ));
        }
        let repositories = std::iter::once(("[storage]".to_string(), &self.storage)).chain(
            self.copies
                .iter()
                .map(|c| (format!("copy `{}`", c.name), &c.storage)),
        );
        for (owner, storage) in repositories {
            if let (Some(mode), StorageUrl::File(_)) = (storage.object_lock, &storage.url) {
                return Err(invalid(format!(
                    "{owner} sets object_lock = \"{mode}\" on a file:// repository; Object Lock is an S3 feature (remove it, or use an S3 bucket with Object Lock enabled)"
                )));
            }
        }
        let mut dir_names = std::collections::BTreeSet::new();
        for dir in &self.directories {
            let name = dir.name.as_str();
            if self.databases.iter().any(|d| d.name.as_str() == name) || !dir_names.insert(name) {
                return Err(invalid(format!(
                    "[[directories]] name `{name}` is already used by a database or another directory; names share the repository"
                )));
            }
            match (&dir.path, &dir.source) {
                (Some(_), Some(_)) => {
                    return Err(invalid(format!(
                        "directory `{name}` sets both `path` and `source`; keep one (path for a local tree, source for an s3:// prefix)"
                    )))
                }
                (None, None) => {
                    return Err(invalid(format!(
                        "directory `{name}` needs `path` (a local tree, like \"/srv/uploads\") or `source` (an S3 prefix, like \"s3://bucket/uploads\")"
                    )))
                }
                (Some(path), None) if !path.is_absolute() => {
                    return Err(invalid(format!(
                        "directory `{name}`: path {} must be absolute",
                        path.display()
                    )));
                }
                _ => {}
            }
            if let Some(source) = &dir.source {
                self.check_source(name, source).map_err(invalid)?;
            }
        }
        let mut copy_names = std::collections::BTreeSet::new();
        for copy in &self.copies {
            let name = copy.name.as_str();
            if name == PRIMARY {
                return Err(invalid(format!(
                    "[[copies]] name = \"{PRIMARY}\" is reserved for [storage]; choose another name"
                )));
            }
            if !copy_names.insert(name) {
                return Err(invalid(format!("two [[copies]] are named `{name}`")));
            }
            if copy.storage.url == self.storage.url {
                return Err(invalid(format!(
                    "copy `{name}` is the [storage] repository itself ({}); a copy must be elsewhere",
                    copy.storage.url
                )));
            }
            if copy.interval_seconds == 0 {
                return Err(invalid(format!(
                    "copy `{name}`: interval_seconds must be at least 1"
                )));
            }
            for class in copy.keep.keys() {
                let scheduled = self
                    .databases
                    .iter()
                    .any(|d| d.classes().any(|c| c == class))
                    || self
                        .directories
                        .iter()
                        .any(|d| d.schedules.iter().any(|s| s.class.as_str() == class));
                if !scheduled {
                    return Err(invalid(format!(
                        "copy `{name}` sets keep for class `{class}`, which no database or directory schedules"
                    )));
                }
            }
        }
        if !(1..=64).contains(&self.agent.max_concurrent_jobs) {
            return Err(invalid(format!(
                "[agent] max_concurrent_jobs = {} is out of range (1 to 64)",
                self.agent.max_concurrent_jobs
            )));
        }
        // Measured exactly: whole-second arithmetic would round 500ms up to 1s half the time.
        let second = std::time::Duration::from_secs(1);
        if self.agent.job_timeout.to_std() < second {
            return Err(invalid(format!(
                "[agent] job_timeout = \"{}\" is too short; give at least 1s",
                self.agent.job_timeout
            )));
        }
        let lock_waits = std::iter::once(("[agent]".to_string(), &self.agent.lock_wait_timeout))
            .chain(self.databases.iter().filter_map(|db| {
                db.lock_wait_timeout
                    .as_ref()
                    .map(|t| (format!("database `{}`", db.name), t))
            }));
        for (owner, wait) in lock_waits {
            if wait.to_std() < second {
                return Err(invalid(format!(
                    "{owner} lock_wait_timeout = \"{wait}\" is too short; give at least 1s (pg_dump waits that long for each table lock)"
                )));
            }
        }
        for db in &self.databases {
            if let Some(k) = db.dump_jobs {
                if !(1..=16).contains(&k) {
                    return Err(invalid(format!(
                        "database `{}`: dump_jobs = {k} is out of range (1 to 16; each is one pg_dump session on the source)",
                        db.name
                    )));
                }
            }
        }
        for n in &self.notify {
            if !(n.url.starts_with("http://") || n.url.starts_with("https://")) {
                return Err(invalid(
                    "[[notify]] url must start with http:// or https://".to_string(),
                ));
            }
        }
        if !(1..=22).contains(&self.compression.level) {
            return Err(invalid(format!(
                "[compression] level = {} is out of range; zstd levels are 1 to 22 (3 is a good default)",
                self.compression.level
            )));
        }
        if self.storage.part_size_mib < 5 || self.storage.part_size_mib > 5 * 1024 {
            return Err(invalid(format!(
                "[storage] part_size_mib = {} is out of range; S3 parts are 5 MiB to 5 GiB",
                self.storage.part_size_mib
            )));
        }
        if !(1..=3600).contains(&self.storage.idle_timeout_secs) {
            return Err(invalid(format!(
                "[storage] idle_timeout_secs = {} is out of range (1 to 3600)",
                self.storage.idle_timeout_secs
            )));
        }
        if let Some(endpoint) = &self.storage.endpoint {
            check_endpoint(endpoint).map_err(|m| invalid(format!("[storage] endpoint: {m}")))?;
        }
        if !(1..=64).contains(&self.storage.max_in_flight) {
            return Err(invalid(format!(
                "[storage] max_in_flight = {} is out of range (1 to 64)",
                self.storage.max_in_flight
            )));
        }
        let mut seen = std::collections::BTreeSet::new();
        for db in &self.databases {
            if !seen.insert(db.name.as_str()) {
                return Err(invalid(format!(
                    "database `{}` is configured twice; names must be unique",
                    db.name
                )));
            }
            if let Some(drill) = &db.drill {
                if drill.durability == DrillDurability::Off
                    && matches!(drill.target, DrillTarget::Server(_))
                {
                    return Err(invalid(format!(
                        "database `{}`: [databases.drill] durability = \"off\" applies only to target = \"ephemeral\"; a scratch server keeps its own settings",
                        db.name
                    )));
                }
            }
            if let Some(c) = &db.continuous {
                if !(1..=300).contains(&c.segment_seconds) {
                    return Err(invalid(format!(
                        "database `{}`: [databases.continuous] segment_seconds = {} is out of range (1 to 300)",
                        db.name, c.segment_seconds
                    )));
                }
                if !(1..=4096).contains(&c.segment_max_mib) {
                    return Err(invalid(format!(
                        "database `{}`: [databases.continuous] segment_max_mib = {} is out of range (1 to 4096)",
                        db.name, c.segment_max_mib
                    )));
                }
            }
            let mut classes = std::collections::BTreeSet::new();
            for s in &db.schedules {
                if !classes.insert(s.class.as_str()) {
                    return Err(invalid(format!(
                        "database `{}` has two schedules of class `{}`; give each class one schedule",
                        db.name, s.class
                    )));
                }
            }
        }
        // Recipients are parsed now so a typo fails at load, not at 3 a.m.
        self.recipients()
            .map_err(|e| invalid(format!("[encryption] {e}")))?;
        Ok(())
    }

    /// The age recipients backups are encrypted to (possibly empty: backup refuses that).
    pub fn recipients(&self) -> Result<Recipients, crate::keys::KeyError> {
        match &self.encryption.recipients_file {
            Some(file) => Recipients::from_file(file),
            None => Recipients::parse_all(
                self.encryption.recipients.iter().map(String::as_str),
                "recipients",
            ),
        }
    }

    /// The database named `name`, or every database when `name` is `None`.
    pub fn databases_named(&self, name: Option<&str>) -> Vec<&DatabaseConfig> {
        self.databases
            .iter()
            .filter(|d| name.is_none_or(|n| d.name.as_str() == n))
            .collect()
    }

    /// How objects written to repository `name` are locked, if it sets `object_lock`.
    pub fn object_lock(&self, name: &str) -> Option<crate::repo::ObjectLock> {
        let mode = self.repository(name)?.object_lock?;
        let overrides = self
            .copies
            .iter()
            .find(|c| c.name.as_str() == name)
            .map(|c| &c.keep);
        let keeps = self
            .databases
            .iter()
            .map(|db| {
                let classes = db
                    .schedules
                    .iter()
                    .map(|s| {
                        let class = s.class.to_string();
                        let keep = overrides
                            .and_then(|o| o.get(&class))
                            .unwrap_or(&s.keep)
                            .clone();
                        (class, keep)
                    })
                    .collect();
                (db.name.to_string(), classes)
            })
            .collect();
        Some(crate::repo::ObjectLock { mode, keeps })
    }

    /// The storage of repository `name`: `primary` ([storage]) or a copy's.
    pub fn repository(&self, name: &str) -> Option<&StorageConfig> {
        if name == PRIMARY {
            return Some(&self.storage);
        }
        self.copies
            .iter()
            .find(|c| c.name.as_str() == name)
            .map(|c| &c.storage)
    }

    pub fn database(&self, name: &str) -> Option<&DatabaseConfig> {
        self.databases.iter().find(|d| d.name.as_str() == name)
    }

    /// How long `pg_dump` of `db` waits for a table lock before it fails.
    pub fn lock_wait_timeout(&self, db: &DatabaseConfig) -> std::time::Duration {
        db.lock_wait_timeout
            .as_ref()
            .unwrap_or(&self.agent.lock_wait_timeout)
            .to_std()
    }

    /// The longest a backup may run ([agent] job_timeout).
    pub fn job_timeout(&self) -> std::time::Duration {
        self.agent.job_timeout.to_std()
    }
}

/// A name used as a path segment in the repository: environment, database or class.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct Name(String);

impl Name {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Name {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= 63
            && s != "."
            && s != ".."
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if ok {
            Ok(Name(s))
        } else {
            Err(format!(
                "invalid name `{s}`: use 1 to 63 characters from letters, digits, `-`, `_` and `.`"
            ))
        }
    }
}

impl FromStr for Name {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Name::try_from(s.to_string())
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An S3 endpoint must be an http(s) URL without credentials (they come from the AWS chain,
/// and a URL is printed in messages). The error never repeats the URL.
fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let url = url::Url::parse(endpoint).map_err(|e| {
        format!(
            "not a URL ({e}); write it like `https://s3.example.com` or `http://127.0.0.1:3900`"
        )
    })?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "credentials do not belong in the endpoint URL: remove `user:password@` and set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile or role) instead"
                .into(),
        );
    }
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "the scheme must be http or https, not `{}`",
            url.scheme()
        ));
    }
    Ok(())
}

/// A calendar-aware duration such as `26h`, `30d` or `7y`.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "String")]
pub struct Duration {
    span: Span,
    text: String,
}

impl Duration {
    pub fn span(&self) -> Span {
        self.span
    }

    /// The instant this duration before `now` (calendar arithmetic in UTC for months and years).
    pub fn before(&self, now: Timestamp) -> Timestamp {
        let zoned = now.to_zoned(jiff::tz::TimeZone::UTC);
        zoned
            .checked_sub(self.span)
            .map(|z| z.timestamp())
            .unwrap_or(Timestamp::MIN)
    }

    /// Length in seconds, measured back from `now` (so `1y` respects leap years).
    pub fn seconds_at(&self, now: Timestamp) -> i64 {
        now.as_second() - self.before(now).as_second()
    }

    /// As a fixed length, measured back from now (for timeouts).
    pub fn to_std(&self) -> std::time::Duration {
        let now = Timestamp::now();
        let before = self.before(now);
        now.duration_since(before)
            .try_into()
            .unwrap_or(std::time::Duration::ZERO)
    }
}

impl TryFrom<String> for Duration {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        let span: Span = text.trim().parse().map_err(|_| {
            format!("invalid duration `{text}`: write it like `26h`, `30d`, `7y` or `1h 30m`")
        })?;
        if span.is_negative() || span.is_zero() {
            return Err(format!("invalid duration `{text}`: it must be positive"));
        }
        Ok(Duration { span, text })
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A cron expression: standard 5 fields (an optional leading seconds field is accepted for
/// tests), or `@daily`, `@weekly`, `@monthly`, `@yearly`, `@hourly`.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "String")]
pub struct CronExpr {
    cron: croner::Cron,
    text: String,
}

impl CronExpr {
    /// The next `n` times this schedule fires strictly after `after`, in `tz`.
    pub fn next_runs(&self, after: &Zoned, n: usize) -> Vec<Zoned> {
        self.cron.iter_after(after.clone()).take(n).collect()
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Every time this schedule fires strictly after `after` and at or before `until`, at
    /// most `cap` of them (the earliest).
    pub fn runs_between(&self, after: &Zoned, until: &Zoned, cap: usize) -> Vec<Zoned> {
        self.cron
            .iter_after(after.clone())
            .take_while(|t| t.timestamp() <= until.timestamp())
            .take(cap)
            .collect()
    }

    /// The last time this schedule fired at or before `at`.
    pub fn previous_run(&self, at: &Zoned) -> Option<Zoned> {
        self.cron.find_previous_occurrence(at, true).ok()
    }
}

impl TryFrom<String> for CronExpr {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        let fields = text.split_whitespace().count();
        let nickname = text.trim_start().starts_with('@');
        if !nickname && !(5..=6).contains(&fields) {
            return Err(format!(
                "invalid cron expression `{text}`: expected 5 fields (minute hour day-of-month month day-of-week), found {fields}"
            ));
        }
        let cron = croner::parser::CronParser::new()
            .parse(&text)
            .map_err(|e| format!("invalid cron expression `{text}`: {e}"))?;
        Ok(CronExpr { cron, text })
    }
}

/// An IANA time zone name such as `UTC` or `Europe/Paris`.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "String")]
pub struct TimeZone(pub jiff::tz::TimeZone, String);

impl TimeZone {
    pub fn name(&self) -> &str {
        &self.1
    }
}

impl TryFrom<String> for TimeZone {
    type Error = String;
    fn try_from(name: String) -> Result<Self, String> {
        jiff::tz::TimeZone::get(&name)
            .map(|tz| TimeZone(tz, name.clone()))
            .map_err(|_| {
                format!(
                    "unknown time zone `{name}`: use an IANA name like `UTC` or `Europe/Berlin`"
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISSUE_EXAMPLE: &str = r#"
environment = "staging"

[storage]
url = "s3://dr-backups/acme"          # or "file:///var/lib/dr/repo"
endpoint = "http://127.0.0.1:3900"    # optional: S3-compatible stores
region = "garage"
path_style = true                     # credentials: the standard AWS chain

[encryption]
recipients = ["age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"]
identity_file = "/etc/dr/identity.txt" # only where restores and drills run

[[databases]]
name = "app"
url = "postgres://backup@db.internal:5432/app"  # password: PGPASSWORD, ~/.pgpass or password_file
rpo = "26h"
rto = "1h"

  [[databases.schedules]]
  class = "daily"
  cron = "0 3 * * *"
  keep = "30d"

  [[databases.schedules]]
  class = "monthly"
  cron = "0 4 1 * *"
  keep = "7y"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("agent.toml"))
    }

    #[test]
    fn issue_example_loads_verbatim() {
        let c = parse(ISSUE_EXAMPLE).unwrap();
        assert_eq!(c.environment.as_str(), "staging");
        assert_eq!(c.databases.len(), 1);
        let db = &c.databases[0];
        assert_eq!(db.schedules.len(), 2);
        assert_eq!(db.schedules[1].keep.to_string(), "7y");
        assert_eq!(c.recipients().unwrap().len(), 1);
        assert!(c.storage.path_style);
    }

    #[test]
    fn a_directory_reads_a_path_or_an_s3_source_never_both_nor_its_own_repository() {
        let with = |entry: &str| {
            parse(&format!(
                "{ISSUE_EXAMPLE}\n[[directories]]\nname = \"uploads\"\n{entry}\n"
            ))
        };
        let c = with("source = \"s3://app-uploads/media\"").unwrap();
        let DirectorySource::S3(s) = c.directories[0].source() else {
            panic!("not an S3 source")
        };
        assert_eq!(s.url.to_string(), "s3://app-uploads/media");
        assert_eq!(s.endpoint, None);
        let c = with("[directories.source]\nurl = \"s3://app-uploads/media\"\nendpoint = \"http://127.0.0.1:3900\"\npath_style = true").unwrap();
        let DirectorySource::S3(s) = c.directories[0].source() else {
            panic!("not an S3 source")
        };
        assert_eq!(s.endpoint.as_deref(), Some("http://127.0.0.1:3900"));
        assert!(matches!(
            with("path = \"/srv/uploads\"").unwrap().directories[0].source(),
            DirectorySource::Path(p) if p == Path::new("/srv/uploads")
        ));
        for (entry, said) in [
            ("path = \"/srv/uploads\"\nsource = \"s3://app-uploads/p\"", "both `path` and `source`"),
            ("rpo = \"1d\"", "needs `path`"),
            ("source = \"file:///srv/uploads\"", "not an s3:// URL"),
            ("[directories.source]\nurl = \"s3://dr-backups\"\nendpoint = \"http://127.0.0.1:3900\"", "overlaps [storage]"),
            ("[directories.source]\nurl = \"s3://dr-backups/acme/uploads\"\nendpoint = \"http://127.0.0.1:3900\"", "overlaps [storage]"),
            ("source = \"s3://k:secret@app-uploads/p\"", "credentials do not belong"),
            ("source = 7", "an s3:// URL, or a table"),
            ("[directories.source]\nurl = \"s3://app-uploads/p\"\nobject_lock = \"governance\"", "object_lock on a source"),
        ] {
            let err = with(entry).unwrap_err().to_string();
            assert!(err.contains(said), "{entry}: {err}");
            assert!(!err.contains("secret"), "{err}");
        }
        // Another prefix of the repository's bucket is fine (or on another endpoint).
        with("[directories.source]\nurl = \"s3://dr-backups/uploads\"\nendpoint = \"http://127.0.0.1:3900\"").unwrap();
        with("source = \"s3://dr-backups\"").unwrap();
        // The same store written another way is the same store.
        let err = with("[directories.source]\nurl = \"s3://dr-backups/acme\"\nendpoint = \"HTTP://127.0.0.1:3900/\"").unwrap_err();
        assert!(err.to_string().contains("overlaps [storage]"), "{err}");
    }

    #[test]
    fn unknown_key_is_rejected_with_line_and_name() {
        let text = ISSUE_EXAMPLE.replace("rto = \"1h\"", "rto = \"1h\"\nrtoo = \"2h\"");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("rtoo"), "{err}");
        assert!(err.contains("line 19"), "{err}");
        assert!(err.contains("agent.toml"), "{err}");
    }

    #[test]
    fn bad_duration_and_cron_are_named() {
        let err = parse(&ISSUE_EXAMPLE.replace("\"30d\"", "\"30 fortnights\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid duration `30 fortnights`"), "{err}");
        assert!(err.contains("line 23"), "{err}");
        let err = parse(&ISSUE_EXAMPLE.replace("0 3 * * *", "0 25 * * *"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("invalid cron expression `0 25 * * *`"),
            "{err}"
        );
        let err = parse(&ISSUE_EXAMPLE.replace("0 3 * * *", "0 3 * *"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected 5 fields"), "{err}");
    }

    #[test]
    fn drill_durability_defaults_to_full_and_is_off_only_for_ephemeral() {
        let drill = |lines: &str| format!("{ISSUE_EXAMPLE}\n  [databases.drill]\n{lines}\n");
        let c = parse(&drill("  target = \"ephemeral\"")).unwrap();
        let d = c.databases[0].drill.as_ref().unwrap();
        assert_eq!(d.durability, DrillDurability::Full);
        let c = parse(&drill("  target = \"ephemeral\"\n  durability = \"off\"")).unwrap();
        let d = c.databases[0].drill.as_ref().unwrap();
        assert_eq!(d.durability, DrillDurability::Off);
        let err = parse(&drill(
            "  target = \"postgres://drill@scratch/postgres\"\n  durability = \"off\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("applies only to target = \"ephemeral\""),
            "{err}"
        );
        let err = parse(&drill("  durability = \"none\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("durability") || err.contains("none"), "{err}");
    }

    #[test]
    fn bad_recipient_fails_at_load() {
        let err = parse(&ISSUE_EXAMPLE.replace("age1ql3z", "age1qXXX"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("recipient"), "{err}");
    }

    #[test]
    fn password_in_url_never_reaches_an_error() {
        let text = ISSUE_EXAMPLE
            .replace("backup@", "backup:hunter2@")
            .replace("26h", "26q");
        let err = parse(&text).unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn storage_credentials_never_reach_an_error() {
        let with_url = ISSUE_EXAMPLE.replace(
            "s3://dr-backups/acme",
            "s3://AKIAEXAMPLE:wJalrXUtnFEMI@dr-backups/acme",
        );
        assert_ne!(with_url, ISSUE_EXAMPLE, "the example names an s3:// url");
        let err = parse(&with_url).unwrap_err().to_string();
        assert!(!err.contains("wJalrXUtnFEMI"), "{err}");
        assert!(err.contains("credentials do not belong"), "{err}");

        let text = ISSUE_EXAMPLE.replace(
            "http://127.0.0.1:3900",
            "http://AKIAEXAMPLE:wJalrXUtnFEMI@127.0.0.1:3900",
        );
        assert_ne!(text, ISSUE_EXAMPLE, "the example names an endpoint");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("credentials do not belong"), "{err}");
        assert!(!err.contains("wJalrXUtnFEMI"), "{err}");
    }

    #[test]
    fn endpoint_with_credentials_is_refused_at_load() {
        let e = check_endpoint("http://AKIAEXAMPLE:wJalrXUtnFEMI@127.0.0.1:3900").unwrap_err();
        assert!(!e.contains("wJalrXUtnFEMI"), "{e}");
        assert!(e.contains("credentials do not belong"), "{e}");
        assert!(check_endpoint("http://127.0.0.1:3900").is_ok());
        assert!(check_endpoint("https://s3.eu-west-1.amazonaws.com").is_ok());
    }

    #[test]
    fn cron_nicknames_and_dst_next_runs() {
        let c = CronExpr::try_from("@daily".to_string()).unwrap();
        let tz = jiff::tz::TimeZone::get("Europe/Berlin").unwrap();
        // Spring forward 2026-03-29: 02:30 does not exist; the job must still run once that day.
        let c230 = CronExpr::try_from("30 2 * * *".to_string()).unwrap();
        let start = jiff::civil::date(2026, 3, 28)
            .at(12, 0, 0, 0)
            .to_zoned(tz.clone())
            .unwrap();
        let runs = c230.next_runs(&start, 2);
        assert_eq!(runs[0].date(), jiff::civil::date(2026, 3, 29));
        assert_eq!(runs[1].date(), jiff::civil::date(2026, 3, 30));
        assert_eq!(c.next_runs(&start, 1)[0].hour(), 0);
    }

    #[test]
    fn credentials_directory_is_expanded_in_secret_paths() {
        let text = ISSUE_EXAMPLE.replace(
            "rpo = \"26h\"",
            "password_file = \"$CREDENTIALS_DIRECTORY/app.password\"\nrpo = \"26h\"",
        );
        // SAFETY: tests in this module do not read this variable concurrently elsewhere.
        unsafe { std::env::remove_var("CREDENTIALS_DIRECTORY") };
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("LoadCredential="), "{err}");
        unsafe { std::env::set_var("CREDENTIALS_DIRECTORY", "/run/credentials/dr-agent.service") };
        let c = parse(&text).unwrap();
        assert_eq!(
            c.databases[0].password_file.as_deref(),
            Some(Path::new("/run/credentials/dr-agent.service/app.password"))
        );
        unsafe { std::env::remove_var("CREDENTIALS_DIRECTORY") };
    }

    #[test]
    fn job_and_lock_wait_timeouts_default_override_and_validate() {
        use std::time::Duration as Std;
        let c = parse(ISSUE_EXAMPLE).unwrap();
        assert_eq!(c.job_timeout(), Std::from_secs(24 * 3600));
        assert_eq!(c.lock_wait_timeout(&c.databases[0]), Std::from_secs(600));
        let text = ISSUE_EXAMPLE
            .replace(
                "[[databases]]",
                "[agent]\njob_timeout = \"2h\"\nlock_wait_timeout = \"1m\"\n\n[[databases]]",
            )
            .replace("rto = \"1h\"", "rto = \"1h\"\nlock_wait_timeout = \"30s\"");
        let c = parse(&text).unwrap();
        assert_eq!(c.job_timeout(), Std::from_secs(7200));
        assert_eq!(c.lock_wait_timeout(&c.databases[0]), Std::from_secs(30));
        let err = parse(&text.replace("\"30s\"", "\"500ms\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("database `app` lock_wait_timeout") && err.contains("too short"),
            "{err}"
        );
        let err = parse(&text.replace("\"2h\"", "\"1ms\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("job_timeout"), "{err}");
    }

    #[test]
    fn keep_of_years_is_calendar_aware() {
        let d = Duration::try_from("1y".to_string()).unwrap();
        let now: Timestamp = "2028-03-01T00:00:00Z".parse().unwrap();
        assert_eq!(d.before(now).to_string(), "2027-03-01T00:00:00Z");
        assert_eq!(d.seconds_at(now), 366 * 86400);
    }
}
