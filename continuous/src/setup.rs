//! `dr continuous setup` / `teardown`: the publication and slot capture reads, created only
//! when nothing about them can make the source's writes fail.
//!
//! A `FOR ALL TABLES` publication makes every UPDATE and DELETE on a published table without
//! a replica identity (no primary key, `REPLICA IDENTITY NOTHING`, or a dropped identity
//! index) fail on the source. Setup therefore lists those tables and refuses, unless the
//! operator chose `REPLICA IDENTITY FULL` for each in the config; the list is checked again
//! inside the transaction that creates the publication, and [`health`] keeps checking it.

use dr_core::config::{DatabaseConfig, SlotName};
use dr_core::pg::{quote_ident, quote_literal, Connection, PgClient, PgError};
use serde::Serialize;

/// PostgreSQL publishes relations from the first OID after the initial catalog
/// (`FirstNormalObjectId`): system and `information_schema` tables never are.
const TABLES_WITHOUT_IDENTITY: &str = "
SELECT format('%I.%I', n.nspname, c.relname)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND c.relpersistence = 'p' AND c.oid >= 16384
  AND CASE c.relreplident
        WHEN 'f' THEN false
        WHEN 'i' THEN NOT EXISTS (SELECT 1 FROM pg_index i
                                  WHERE i.indrelid = c.oid AND i.indisreplident AND i.indisvalid)
        WHEN 'd' THEN NOT EXISTS (SELECT 1 FROM pg_index i
                                  WHERE i.indrelid = c.oid AND i.indisprimary)
        ELSE true
      END
ORDER BY 1";

/// Setup waits this long for a table lock (ALTER TABLE ... REPLICA IDENTITY), so it never
/// queues production's queries behind it for longer.
const LOCK_TIMEOUT: &str = "5s";

/// Creating a slot waits for the transactions running at that moment to end.
const SLOT_TIMEOUT: &str = "10min";

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("database `{0}` has no [databases.continuous] section in the config")]
    NotContinuous(String),
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error("{what} failed on database `{database}`: {message}; nothing was changed")]
    Step {
        what: String,
        database: String,
        message: String,
    },
}

/// Where the server runs, for the fix a missing prerequisite needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Platform {
    /// Amazon RDS or Aurora (the `rds.logical_replication` parameter exists).
    Rds,
    SelfHosted,
}

/// One prerequisite: met or not, what was found, and the fix when it is not.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub found: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct SetupReport {
    pub database: String,
    pub server_version: String,
    pub platform: Platform,
    pub slot: String,
    pub publication: String,
    pub checks: Vec<Check>,
    /// Published tables whose UPDATE and DELETE would fail: the reason setup refuses.
    pub tables_without_identity: Vec<String>,
    /// Tables set (or, in a dry run, to be set) to `REPLICA IDENTITY FULL`, as configured.
    pub replica_identity_full: Vec<String>,
    /// `replica_identity_full` entries that name no table lacking an identity (a typo, or a
    /// table that has a primary key now).
    pub replica_identity_full_unused: Vec<String>,
    /// What was done (or, in a dry run, would be), in order.
    pub actions: Vec<String>,
    pub dry_run: bool,
    /// Every check passed and no table lacks an identity.
    pub ready: bool,
}

impl SetupReport {
    /// Why setup refused, in one sentence; `None` when it was ready.
    pub fn refusal(&self) -> Option<String> {
        if self.ready {
            return None;
        }
        let missing = self.checks.iter().filter(|c| !c.ok).count();
        let mut parts = Vec::new();
        if missing > 0 {
            parts.push(format!(
                "{missing} prerequisite{} missing",
                if missing == 1 { "" } else { "s" }
            ));
        }
        let tables = self.tables_without_identity.len();
        if tables > 0 {
            parts.push(format!(
                "{tables} table{} without a replica identity",
                if tables == 1 { "" } else { "s" }
            ));
        }
        Some(parts.join(", "))
    }
}

/// What the server says about the prerequisites, in one round trip.
struct Facts {
    version: String,
    wal_level: String,
    rds_logical: Option<String>,
    user: String,
    superuser: bool,
    replication: bool,
    rds_replication: bool,
    rds_superuser: bool,
    max_slots: i32,
    slots_used: i32,
    max_wal_senders: i32,
}

impl Facts {
    async fn read(client: &PgClient) -> Result<Facts, PgError> {
        let row = client
            .query_one(
                "SELECT current_setting('server_version'),
                        current_setting('wal_level'),
                        (SELECT setting FROM pg_settings WHERE name = 'rds.logical_replication'),
                        current_user::text,
                        r.rolsuper,
                        r.rolreplication,
                        EXISTS (SELECT 1 FROM pg_roles g WHERE g.rolname = 'rds_replication'
                                AND pg_has_role(current_user, g.oid, 'MEMBER')),
                        EXISTS (SELECT 1 FROM pg_roles g WHERE g.rolname = 'rds_superuser'
                                AND pg_has_role(current_user, g.oid, 'MEMBER')),
                        current_setting('max_replication_slots')::int4,
                        (SELECT count(*) FROM pg_replication_slots)::int4,
                        current_setting('max_wal_senders')::int4
                 FROM pg_roles r WHERE r.rolname = current_user",
                &[],
            )
            .await?;
        let version: String = row.get(0);
        Ok(Facts {
            version: version
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string(),
            wal_level: row.get(1),
            rds_logical: row.get(2),
            user: row.get(3),
            superuser: row.get(4),
            replication: row.get(5),
            rds_replication: row.get(6),
            rds_superuser: row.get(7),
            max_slots: row.get(8),
            slots_used: row.get(9),
            max_wal_senders: row.get(10),
        })
    }

    fn platform(&self) -> Platform {
        if self.rds_logical.is_some() {
            Platform::Rds
        } else {
            Platform::SelfHosted
        }
    }
}

/// The slot as the server has it, if it exists.
struct SlotState {
    plugin: Option<String>,
    database: Option<String>,
    active_pid: Option<i32>,
    wal_status: Option<String>,
    retained_bytes: Option<i64>,
}

async fn slot_state(client: &PgClient, slot: &SlotName) -> Result<Option<SlotState>, PgError> {
    let rows = client
        .query(
            "SELECT plugin::text, database::text, active_pid, wal_status,
                    pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot.as_str()],
        )
        .await?;
    Ok(rows.first().map(|row| SlotState {
        plugin: row.get(0),
        database: row.get(1),
        active_pid: row.get(2),
        wal_status: row.get(3),
        retained_bytes: row.get(4),
    }))
}

/// `Some(all_tables)` when the publication exists.
async fn publication_state(client: &PgClient, name: &SlotName) -> Result<Option<bool>, PgError> {
    let rows = client
        .query(
            "SELECT puballtables FROM pg_publication WHERE pubname = $1",
            &[&name.as_str()],
        )
        .await?;
    Ok(rows.first().map(|r| r.get(0)))
}

async fn tables_without_identity(client: &PgClient) -> Result<Vec<String>, PgError> {
    let rows = client.query(TABLES_WITHOUT_IDENTITY, &[]).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

fn names(db: &DatabaseConfig) -> Result<(SlotName, SlotName), SetupError> {
    db.continuous_names()
        .ok_or_else(|| SetupError::NotContinuous(db.name.to_string()))
}

/// Checks the prerequisites and, unless `dry_run` or something is missing, creates the
/// publication (setting the configured tables' replica identity in the same transaction)
/// and then the slot. Running it again on a database that is set up changes nothing.
pub async fn setup(
    db: &DatabaseConfig,
    conn: &Connection,
    dry_run: bool,
) -> Result<SetupReport, SetupError> {
    let (slot, publication) = names(db)?;
    let chosen_full = db
        .continuous
        .as_ref()
        .map(|c| c.replica_identity_full.clone())
        .unwrap_or_default();
    let client = conn.connect("dr continuous setup").await?;
    let facts = Facts::read(&client).await?;
    let slot_now = slot_state(&client, &slot).await?;
    let publication_now = publication_state(&client, &publication).await?;
    let lacking = tables_without_identity(&client).await?;

    let checks = checks(
        &facts,
        &slot,
        slot_now.as_ref(),
        &publication,
        publication_now,
    );
    let (to_set, unresolved): (Vec<String>, Vec<String>) = lacking
        .iter()
        .cloned()
        .partition(|t| chosen_full.contains(t));
    let unused = chosen_full
        .iter()
        .filter(|t| !lacking.contains(t))
        .cloned()
        .collect();
    let ready = checks.iter().all(|c| c.ok) && unresolved.is_empty();
    let mut report = SetupReport {
        database: db.name.to_string(),
        server_version: facts.version.clone(),
        platform: facts.platform(),
        slot: slot.to_string(),
        publication: publication.to_string(),
        checks,
        tables_without_identity: unresolved,
        replica_identity_full: to_set.clone(),
        replica_identity_full_unused: unused,
        actions: Vec::new(),
        dry_run,
        ready,
    };

    let plan_publication = publication_now.is_none();
    let plan_slot = slot_now.is_none();
    for table in &to_set {
        report
            .actions
            .push(format!("ALTER TABLE {table} REPLICA IDENTITY FULL"));
    }
    if plan_publication {
        report
            .actions
            .push(format!("CREATE PUBLICATION {publication} FOR ALL TABLES"));
    }
    if plan_slot {
        report.actions.push(format!(
            "create the logical replication slot {slot} (pgoutput)"
        ));
    }
    if !ready || dry_run {
        return Ok(report);
    }

    if !to_set.is_empty() || plan_publication {
        create_publication(
            &client,
            db,
            &publication,
            &to_set,
            plan_publication,
            &mut report,
        )
        .await?;
        if !report.ready {
            return Ok(report);
        }
    }
    if plan_slot {
        if let Err(e) = create_slot(&client, db, &slot).await {
            // Leave the source as it was: a publication without its slot is only clutter,
            // but setup promised all or nothing.
            if plan_publication {
                let drop = format!("DROP PUBLICATION IF EXISTS {publication}");
                if let Err(undo) = client.execute(&drop).await {
                    tracing::error!(database = %db.name, error = %undo, "could not drop the publication after the slot failed; drop it by hand: {drop}");
                }
            }
            return Err(e);
        }
    }
    if report.actions.is_empty() {
        report
            .actions
            .push("nothing: the publication and slot are already set up".into());
    }
    tracing::info!(database = %db.name, slot = %slot, publication = %publication, "continuous capture set up");
    Ok(report)
}

/// One transaction: the replica identities, the publication, then the list of tables
/// without identity again. A table created since the first look rolls it all back.
async fn create_publication(
    client: &PgClient,
    db: &DatabaseConfig,
    publication: &SlotName,
    to_set: &[String],
    create: bool,
    report: &mut SetupReport,
) -> Result<(), SetupError> {
    let step = |what: &str, e: PgError| SetupError::Step {
        what: what.to_string(),
        database: db.name.to_string(),
        message: match e {
            PgError::Query { message, .. } => message,
            other => other.to_string(),
        },
    };
    client
        .execute(&format!(
            "BEGIN; SET LOCAL lock_timeout = {}",
            quote_literal(LOCK_TIMEOUT)
        ))
        .await?;
    for table in to_set {
        // `table` is the server's own format('%I.%I') of an existing table: quoted already.
        let sql = format!("ALTER TABLE {table} REPLICA IDENTITY FULL");
        if let Err(e) = client.execute(&sql).await {
            let _ = client.execute("ROLLBACK").await;
            return Err(step(&format!("`{sql}`"), e));
        }
    }
    if create {
        let sql = format!("CREATE PUBLICATION {publication} FOR ALL TABLES");
        if let Err(e) = client.execute(&sql).await {
            let _ = client.execute("ROLLBACK").await;
            return Err(step(&format!("`{sql}`"), e));
        }
    }
    let lacking = match tables_without_identity(client).await {
        Ok(lacking) => lacking,
        Err(e) => {
            let _ = client.execute("ROLLBACK").await;
            return Err(e.into());
        }
    };
    if !lacking.is_empty() {
        client.execute("ROLLBACK").await?;
        report.tables_without_identity = lacking;
        report.ready = false;
        report.actions.clear();
        return Ok(());
    }
    client
        .execute("COMMIT")
        .await
        .map_err(|e| step("committing the publication", e))
}

async fn create_slot(
    client: &PgClient,
    db: &DatabaseConfig,
    slot: &SlotName,
) -> Result<(), SetupError> {
    client
        .execute(&format!(
            "SET statement_timeout = {}",
            quote_literal(SLOT_TIMEOUT)
        ))
        .await?;
    let result = client
        .query(
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot.as_str()],
        )
        .await;
    let _ = client.execute("RESET statement_timeout").await;
    match result {
        Ok(_) => Ok(()),
        Err(PgError::Query {
            message, sqlstate, ..
        }) => Err(SetupError::Step {
            what: format!("creating the replication slot {slot}"),
            database: db.name.to_string(),
            message: if sqlstate.as_deref() == Some("57014") {
                format!("it waited {SLOT_TIMEOUT} for the transactions running when it started to end ({message}); find them in pg_stat_activity (oldest xact_start) and retry")
            } else {
                message
            },
        }),
        Err(e) => Err(e.into()),
    }
}

fn checks(
    f: &Facts,
    slot: &SlotName,
    slot_now: Option<&SlotState>,
    publication: &SlotName,
    publication_now: Option<bool>,
) -> Vec<Check> {
    let rds = f.platform() == Platform::Rds;
    let user = quote_ident(&f.user);
    let mut checks = Vec::new();

    let major: u32 = f
        .version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    checks.push(Check {
        name: "server_version",
        ok: major >= 14,
        found: format!("PostgreSQL {}", f.version),
        fix: (major < 14).then(|| "continuous capture needs PostgreSQL 14 or newer".into()),
    });

    let logical = f.wal_level == "logical";
    checks.push(Check {
        name: "wal_level",
        ok: logical,
        found: match &f.rds_logical {
            Some(v) => format!("wal_level = {}, rds.logical_replication = {v}", f.wal_level),
            None => format!("wal_level = {}", f.wal_level),
        },
        fix: (!logical).then(|| {
            if rds {
                "set rds.logical_replication = 1 in the instance's DB parameter group (Aurora: the cluster parameter group), then reboot the instance".into()
            } else {
                "run ALTER SYSTEM SET wal_level = logical; as a superuser and restart PostgreSQL (on a managed service, enable logical replication in its settings)".into()
            }
        }),
    });

    let may_decode = f.superuser || f.replication || f.rds_replication;
    checks.push(Check {
        name: "replication_privilege",
        ok: may_decode,
        found: format!(
            "role {} is {}",
            f.user,
            if f.superuser {
                "a superuser"
            } else if f.replication {
                "REPLICATION"
            } else if f.rds_replication {
                "a member of rds_replication"
            } else {
                "neither superuser nor REPLICATION"
            }
        ),
        fix: (!may_decode).then(|| {
            if rds {
                format!("as the master user: GRANT rds_replication TO {user};")
            } else {
                format!("as a superuser: ALTER ROLE {user} REPLICATION;")
            }
        }),
    });

    // PostgreSQL 15 allows a FOR ALL TABLES publication to superusers only (on RDS the
    // rds_superuser role stands in).
    let may_publish = publication_now.is_some() || f.superuser || f.rds_superuser;
    checks.push(Check {
        name: "publication",
        ok: may_publish && publication_now != Some(false),
        found: match publication_now {
            Some(true) => format!("publication {publication} exists, FOR ALL TABLES"),
            Some(false) => format!("publication {publication} exists but does not publish all tables"),
            None if may_publish => format!("publication {publication} does not exist yet; {} may create it", f.user),
            None => format!("publication {publication} does not exist and {} may not create a FOR ALL TABLES publication", f.user),
        },
        fix: match publication_now {
            Some(false) => Some(format!("it was not created by dr: drop it (DROP PUBLICATION {publication};) or set [databases.continuous] publication to another name")),
            Some(true) => None,
            None if may_publish => None,
            None => Some(format!(
                "have {} run CREATE PUBLICATION {publication} FOR ALL TABLES; then run setup again",
                if rds { "the master user (rds_superuser)" } else { "a superuser" }
            )),
        },
    });

    let slot_ok = match slot_now {
        None => f.slots_used < f.max_slots,
        Some(s) => {
            s.plugin.as_deref() == Some("pgoutput") && s.wal_status.as_deref() != Some("lost")
        }
    };
    checks.push(Check {
        name: "replication_slot",
        ok: slot_ok,
        found: match slot_now {
            None => format!(
                "slot {slot} does not exist yet; {} of max_replication_slots = {} in use",
                f.slots_used, f.max_slots
            ),
            Some(s) => format!(
                "slot {slot} exists (plugin {}, database {}, wal_status {})",
                s.plugin.as_deref().unwrap_or("none: a physical slot"),
                s.database.as_deref().unwrap_or("none"),
                s.wal_status.as_deref().unwrap_or("unknown")
            ),
        },
        fix: (!slot_ok).then(|| match slot_now {
            None if rds => "raise max_replication_slots in the DB parameter group (reboot needed), or drop an unused slot".to_string(),
            None => "raise max_replication_slots (ALTER SYSTEM SET max_replication_slots = ...; restart), or drop an unused slot (SELECT pg_drop_replication_slot('name'))".to_string(),
            Some(s) if s.wal_status.as_deref() == Some("lost") => "the slot lost WAL it needed (max_slot_wal_keep_size): run `dr continuous teardown` and setup again to start a new chain".to_string(),
            Some(_) => format!("slot {slot} is not a pgoutput logical slot (not dr's): drop it or set [databases.continuous] slot to another name"),
        }),
    });

    checks.push(Check {
        name: "max_wal_senders",
        ok: true,
        found: format!(
            "max_wal_senders = {} (not needed: dr reads the slot through SQL, not a walsender)",
            f.max_wal_senders
        ),
        fix: None,
    });
    checks
}

#[derive(Debug, Serialize)]
pub struct TeardownReport {
    pub database: String,
    pub slot: String,
    pub publication: String,
    pub actions: Vec<String>,
    pub dry_run: bool,
}

/// Drops the slot (so the source stops retaining WAL for it) and the publication. Refuses
/// while a session is reading the slot. Replica identities set at setup stay as they are.
pub async fn teardown(
    db: &DatabaseConfig,
    conn: &Connection,
    dry_run: bool,
) -> Result<TeardownReport, SetupError> {
    let (slot, publication) = names(db)?;
    let client = conn.connect("dr continuous teardown").await?;
    let slot_now = slot_state(&client, &slot).await?;
    let publication_now = publication_state(&client, &publication).await?;
    let mut report = TeardownReport {
        database: db.name.to_string(),
        slot: slot.to_string(),
        publication: publication.to_string(),
        actions: Vec::new(),
        dry_run,
    };
    if let Some(s) = &slot_now {
        if let Some(pid) = s.active_pid {
            return Err(SetupError::Step {
                what: format!("dropping the replication slot {slot}"),
                database: db.name.to_string(),
                message: format!("the slot is in use by server process {pid} (a running `dr agent` capturing it?): stop that first"),
            });
        }
        report.actions.push(format!(
            "drop the replication slot {slot}{}",
            s.retained_bytes
                .map(|b| format!(" (it holds back {} of WAL)", human_bytes(b)))
                .unwrap_or_default()
        ));
    }
    if publication_now.is_some() {
        report
            .actions
            .push(format!("DROP PUBLICATION {publication}"));
    }
    if dry_run || report.actions.is_empty() {
        return Ok(report);
    }
    if slot_now.is_some() {
        client
            .query("SELECT pg_drop_replication_slot($1)", &[&slot.as_str()])
            .await
            .map_err(|e| SetupError::Step {
                what: format!("dropping the replication slot {slot}"),
                database: db.name.to_string(),
                message: e.to_string(),
            })?;
    }
    if publication_now.is_some() {
        client
            .execute(&format!("DROP PUBLICATION IF EXISTS {publication}"))
            .await?;
    }
    tracing::info!(database = %db.name, slot = %slot, publication = %publication, "continuous capture torn down");
    Ok(report)
}

/// Replaces a slot PostgreSQL invalidated (it lost WAL it needed) with a new one: a new
/// chain of changes. The old slot can never be read again; what it had not delivered is lost,
/// which restore reports as a gap until the next backup.
pub async fn restart_chain(db: &DatabaseConfig, conn: &Connection) -> Result<(), SetupError> {
    let (slot, _) = names(db)?;
    let client = conn.connect("dr continuous new chain").await?;
    if let Some(state) = slot_state(&client, &slot).await? {
        if state.wal_status.as_deref() != Some("lost") {
            return Ok(());
        }
        client
            .query("SELECT pg_drop_replication_slot($1)", &[&slot.as_str()])
            .await?;
    }
    create_slot(&client, db, &slot).await?;
    tracing::warn!(database = %db.name, slot = %slot, "started a new chain: the invalidated slot was replaced");
    Ok(())
}

/// A set-up slot's state, as the agent watches it.
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    /// WAL the source keeps for the slot (current LSN − restart LSN); `None` without a slot.
    pub retained_bytes: Option<i64>,
    /// `reserved`, `extended`, `unreserved` or `lost` (the slot can no longer be read).
    pub wal_status: Option<String>,
    pub slot_exists: bool,
    /// Published tables whose UPDATE and DELETE fail on the source right now.
    pub tables_without_identity: Vec<String>,
}

impl Health {
    pub fn slot_lost(&self) -> bool {
        self.wal_status.as_deref() == Some("lost")
    }
}

pub async fn health(db: &DatabaseConfig, conn: &Connection) -> Result<Health, SetupError> {
    let (slot, publication) = names(db)?;
    let client = conn.connect("dr continuous health").await?;
    let slot_now = slot_state(&client, &slot).await?;
    let published = publication_state(&client, &publication).await? == Some(true);
    Ok(Health {
        retained_bytes: slot_now.as_ref().and_then(|s| s.retained_bytes),
        wal_status: slot_now.as_ref().and_then(|s| s.wal_status.clone()),
        slot_exists: slot_now.is_some(),
        tables_without_identity: if published {
            tables_without_identity(&client).await?
        } else {
            Vec::new()
        },
    })
}

fn human_bytes(n: i64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if n >= 1024 * 1024 * 1024 {
        format!("{:.1} GiB", n as f64 / (MIB * 1024.0))
    } else {
        format!("{:.1} MiB", n as f64 / MIB)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts {
        Facts {
            version: "15.18".into(),
            wal_level: "logical".into(),
            rds_logical: None,
            user: "backup".into(),
            superuser: false,
            replication: true,
            rds_replication: false,
            rds_superuser: false,
            max_slots: 10,
            slots_used: 0,
            max_wal_senders: 10,
        }
    }

    fn failing(checks: &[Check]) -> Vec<&'static str> {
        checks.iter().filter(|c| !c.ok).map(|c| c.name).collect()
    }

    fn name(s: &str) -> SlotName {
        SlotName::try_from(s.to_string()).unwrap()
    }

    #[test]
    fn each_missing_prerequisite_names_its_fix_per_platform() {
        let (slot, publication) = (name("dr_app"), name("dr_app"));
        let mut f = facts();
        f.wal_level = "replica".into();
        f.replication = false;
        f.slots_used = 10;
        let c = checks(&f, &slot, None, &publication, None);
        assert_eq!(
            failing(&c),
            [
                "wal_level",
                "replication_privilege",
                "publication",
                "replication_slot"
            ]
        );
        let fixes: String = c.iter().filter_map(|c| c.fix.clone()).collect();
        assert!(
            fixes.contains("ALTER SYSTEM SET wal_level = logical"),
            "{fixes}"
        );
        assert!(
            fixes.contains("ALTER ROLE \"backup\" REPLICATION"),
            "{fixes}"
        );

        f.rds_logical = Some("0".into());
        let c = checks(&f, &slot, None, &publication, None);
        let fixes: String = c.iter().filter_map(|c| c.fix.clone()).collect();
        assert!(fixes.contains("rds.logical_replication = 1"), "{fixes}");
        assert!(
            fixes.contains("GRANT rds_replication TO \"backup\""),
            "{fixes}"
        );
        assert!(fixes.contains("master user"), "{fixes}");
    }

    #[test]
    fn an_existing_publication_needs_no_superuser_and_a_foreign_one_is_refused() {
        let (slot, publication) = (name("dr_app"), name("dr_app"));
        let f = facts();
        assert!(failing(&checks(&f, &slot, None, &publication, Some(true))).is_empty());
        assert_eq!(
            failing(&checks(&f, &slot, None, &publication, Some(false))),
            ["publication"]
        );
    }

    #[test]
    fn a_lost_or_foreign_slot_is_refused() {
        let (slot, publication) = (name("dr_app"), name("dr_app"));
        let f = facts();
        let state = |plugin: &str, wal: &str| SlotState {
            plugin: Some(plugin.into()),
            database: Some("app".into()),
            active_pid: None,
            wal_status: Some(wal.into()),
            retained_bytes: Some(0),
        };
        let ok = state("pgoutput", "reserved");
        assert!(failing(&checks(&f, &slot, Some(&ok), &publication, Some(true))).is_empty());
        let lost = state("pgoutput", "lost");
        let c = checks(&f, &slot, Some(&lost), &publication, Some(true));
        assert_eq!(failing(&c), ["replication_slot"]);
        assert!(c[4].fix.as_deref().unwrap().contains("teardown"));
        let foreign = state("test_decoding", "reserved");
        assert_eq!(
            failing(&checks(&f, &slot, Some(&foreign), &publication, Some(true))),
            ["replication_slot"]
        );
    }
}
