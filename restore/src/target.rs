//! The destination database. A restore never writes into a database that holds any user
//! object unless told to (`--force`), and only ever drops a database this run created.

use dr_core::pg::{quote_ident, Connection, PgClient, PgError, PgTools, ServerVersion};

/// What the target looked like before we touched it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetState {
    pub exists: bool,
    /// User objects of any kind: relations, types, functions, large objects, schemas other
    /// than `public`, extensions other than `plpgsql`.
    pub relations: u64,
}

pub struct Target {
    pub conn: Connection,
    pub tools: PgTools,
    pub server: ServerVersion,
}

/// Counts every user object a restore could collide with or destroy. Objects that belong to
/// an extension count once, as the extension.
const USER_OBJECTS: &str = "
WITH ours AS (
  SELECT oid FROM pg_namespace
  WHERE nspname !~ '^pg_' AND nspname <> 'information_schema'
), ext AS (
  SELECT classid, objid FROM pg_depend WHERE deptype = 'e'
)
SELECT
  (SELECT count(*) FROM pg_class c
     WHERE c.relnamespace IN (SELECT oid FROM ours)
       AND c.relkind IN ('r','p','v','m','S','f','c')
       AND NOT EXISTS (SELECT 1 FROM ext WHERE classid = 'pg_class'::regclass AND objid = c.oid))
+ (SELECT count(*) FROM pg_type t
     WHERE t.typnamespace IN (SELECT oid FROM ours)
       AND t.typrelid = 0 AND t.typelem = 0
       AND NOT EXISTS (SELECT 1 FROM ext WHERE classid = 'pg_type'::regclass AND objid = t.oid))
+ (SELECT count(*) FROM pg_proc p
     WHERE p.pronamespace IN (SELECT oid FROM ours)
       AND NOT EXISTS (SELECT 1 FROM ext WHERE classid = 'pg_proc'::regclass AND objid = p.oid))
+ (SELECT count(*) FROM pg_largeobject_metadata)
+ (SELECT count(*) FROM pg_namespace n
     WHERE n.oid IN (SELECT oid FROM ours) AND n.nspname <> 'public'
       AND NOT EXISTS (SELECT 1 FROM ext WHERE classid = 'pg_namespace'::regclass AND objid = n.oid))
+ (SELECT count(*) FROM pg_extension WHERE extname <> 'plpgsql')";

impl Target {
    /// Connects to the target server (through its maintenance database, since the target
    /// itself may not exist yet) and picks a `pg_restore` new enough for both the server
    /// and the archive (`archive_major`).
    pub async fn connect(conn: Connection, archive_major: u32) -> Result<Target, PgError> {
        let server = maintenance(&conn).await?.server_version().await?;
        let found = tokio::task::spawn_blocking(PgTools::discover)
            .await
            .expect("tool discovery panicked");
        let needed = ServerVersion {
            num: server.num.max(archive_major * 10_000),
            text: server.text.clone(),
        };
        let tools = PgTools::for_server(&found, &needed)?;
        Ok(Target {
            conn,
            tools,
            server,
        })
    }

    pub fn database(&self) -> &str {
        self.conn.url.dbname()
    }

    pub async fn inspect(&self) -> Result<TargetState, PgError> {
        let admin = maintenance(&self.conn).await?;
        let exists = admin
            .query(
                "SELECT 1 FROM pg_database WHERE datname = $1",
                &[&self.database()],
            )
            .await?
            .len()
            == 1;
        if !exists {
            return Ok(TargetState {
                exists,
                relations: 0,
            });
        }
        let target = self.conn.connect("dr restore").await?;
        let n: i64 = target.query_one(USER_OBJECTS, &[]).await?.get(0);
        Ok(TargetState {
            exists,
            relations: n as u64,
        })
    }

    pub async fn create(&self) -> Result<(), PgError> {
        let admin = maintenance(&self.conn).await?;
        admin
            .execute(&format!("CREATE DATABASE {}", quote_ident(self.database())))
            .await?;
        tracing::info!(database = self.database(), "created the target database");
        Ok(())
    }

    /// Drops the target. Callers only do this for a database this run created.
    pub async fn drop_created(&self) -> Result<(), PgError> {
        let admin = maintenance(&self.conn).await?;
        let force = if self.server.num >= 130_000 {
            " WITH (FORCE)"
        } else {
            ""
        };
        admin
            .execute(&format!(
                "DROP DATABASE IF EXISTS {}{force}",
                quote_ident(self.database())
            ))
            .await?;
        tracing::warn!(
            database = self.database(),
            "dropped the database this restore created"
        );
        Ok(())
    }

    /// A session on the target database itself.
    pub async fn session(&self, purpose: &str) -> Result<PgClient, PgError> {
        self.conn.connect(purpose).await
    }

    /// A session on the target's server, outside the target database.
    pub async fn admin_session(&self) -> Result<PgClient, PgError> {
        maintenance(&self.conn).await
    }
}

/// A session on the server's maintenance database (`postgres`, else `template1`).
async fn maintenance(conn: &Connection) -> Result<PgClient, PgError> {
    match conn.for_database("postgres").connect("dr restore").await {
        Ok(c) => Ok(c),
        Err(first) => conn
            .for_database("template1")
            .connect("dr restore")
            .await
            .map_err(|_| first),
    }
}
