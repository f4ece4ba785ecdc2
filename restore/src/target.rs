//! The destination database. A restore never writes into a database that holds relations
//! unless told to (`--force`), and only ever drops a database this run created.

use dr_core::pg::{quote_ident, quote_literal, Connection, PgError, PgTools, ServerVersion};

/// What the target looked like before we touched it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetState {
    pub exists: bool,
    /// Tables, views, sequences and other user relations.
    pub relations: u64,
}

pub struct Target {
    pub conn: Connection,
    pub tools: PgTools,
    pub server: ServerVersion,
}

impl Target {
    /// Connects to the target server (through its maintenance database, since the target
    /// itself may not exist yet) and picks a `pg_restore` new enough for both the server
    /// and the archive (`archive_major`).
    pub fn connect(conn: Connection, archive_major: u32) -> Result<Target, PgError> {
        let found = PgTools::discover();
        let probe = PgTools::newest(&found)?;
        let server = maintenance(&conn, probe)?.server_version(probe)?;
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

    pub fn inspect(&self) -> Result<TargetState, PgError> {
        let admin = maintenance(&self.conn, &self.tools)?;
        let exists = admin.query(
            &self.tools,
            &format!(
                "select count(*) from pg_database where datname = {}",
                quote_literal(self.database())
            ),
        )? == "1";
        if !exists {
            return Ok(TargetState {
                exists,
                relations: 0,
            });
        }
        let relations = self
            .conn
            .query(
                &self.tools,
                "select count(*) from pg_class c join pg_namespace n on n.oid = c.relnamespace \
                 where c.relkind in ('r','p','v','m','S','f') \
                 and n.nspname not in ('pg_catalog','information_schema') \
                 and n.nspname !~ '^pg_toast'",
            )?
            .parse()
            .unwrap_or(u64::MAX);
        Ok(TargetState { exists, relations })
    }

    pub fn create(&self) -> Result<(), PgError> {
        let admin = maintenance(&self.conn, &self.tools)?;
        admin.query(
            &self.tools,
            &format!("create database {}", quote_ident(self.database())),
        )?;
        tracing::info!(database = self.database(), "created the target database");
        Ok(())
    }

    /// Drops the target. Callers only do this for a database this run created.
    pub fn drop_created(&self) -> Result<(), PgError> {
        let admin = maintenance(&self.conn, &self.tools)?;
        let force = if self.server.num >= 130_000 {
            " with (force)"
        } else {
            ""
        };
        admin.query(
            &self.tools,
            &format!(
                "drop database if exists {}{force}",
                quote_ident(self.database())
            ),
        )?;
        tracing::warn!(
            database = self.database(),
            "dropped the database this restore created"
        );
        Ok(())
    }
}

/// A connection to the server's maintenance database (`postgres`, else `template1`).
fn maintenance(conn: &Connection, tools: &PgTools) -> Result<Connection, PgError> {
    let admin = conn.for_database("postgres");
    match admin.query(tools, "select 1") {
        Ok(_) => Ok(admin),
        Err(first) => {
            let template = conn.for_database("template1");
            template
                .query(tools, "select 1")
                .map(|_| template)
                .map_err(|_| first)
        }
    }
}
