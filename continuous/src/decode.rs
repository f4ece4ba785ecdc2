//! Reading change segments back: the frames of a segment's plaintext, the `pgoutput`
//! messages in them (protocol version 1), and the SQL that replays a transaction.
//!
//! Values arrive in text form, written with the capture session's fixed output settings
//! (ISO dates, UTC, hex bytea, exact floats); the replay writes them as string literals,
//! which the target converts to each column's type as an INSERT of the same text would.

use std::collections::HashMap;
use std::io::{self, Read};

use dr_core::pg::{quote_ident, quote_literal};
use jiff::Timestamp;

use crate::capture::MAGIC;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("reading the segment failed: {0}")]
    Io(#[from] io::Error),
    #[error("the segment is not a dr change segment (bad header)")]
    BadMagic,
    #[error("the segment is cut short: no end marker")]
    Truncated,
    #[error("unknown frame {0:#04x} in the segment")]
    BadFrame(u8),
    #[error("a pgoutput message is malformed: {0}")]
    BadMessage(String),
    #[error("a change names relation {0}, which no Relation message described before it")]
    UnknownRelation(u32),
}

/// One frame of a segment.
#[derive(Debug)]
pub enum Frame {
    Message { lsn: u64, data: Vec<u8> },
    Sequences(Vec<(String, Option<i64>)>),
}

/// Reads a segment's frames one at a time, checking its header and end marker.
pub struct Frames<R> {
    inner: R,
    started: bool,
    ended: bool,
}

impl<R: Read> Frames<R> {
    pub fn new(inner: R) -> Self {
        Frames {
            inner,
            started: false,
            ended: false,
        }
    }

    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        if !self.started {
            let mut magic = vec![0u8; MAGIC.len()];
            self.inner
                .read_exact(&mut magic)
                .map_err(|_| DecodeError::BadMagic)?;
            if magic != MAGIC {
                return Err(DecodeError::BadMagic);
            }
            self.started = true;
        }
        if self.ended {
            return Ok(None);
        }
        let mut tag = [0u8; 1];
        if self.inner.read(&mut tag)? == 0 {
            return Err(DecodeError::Truncated);
        }
        match tag[0] {
            b'M' => {
                let lsn = self.u64()?;
                let data = self.bytes()?;
                Ok(Some(Frame::Message { lsn, data }))
            }
            b'S' => {
                let json = self.bytes()?;
                let values = serde_json::from_slice(&json)
                    .map_err(|e| DecodeError::BadMessage(format!("sequence values: {e}")))?;
                Ok(Some(Frame::Sequences(values)))
            }
            b'E' => {
                self.ended = true;
                Ok(None)
            }
            other => Err(DecodeError::BadFrame(other)),
        }
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut b = [0u8; 8];
        self.inner
            .read_exact(&mut b)
            .map_err(|_| DecodeError::Truncated)?;
        Ok(u64::from_be_bytes(b))
    }

    fn bytes(&mut self) -> Result<Vec<u8>, DecodeError> {
        let mut b = [0u8; 4];
        self.inner
            .read_exact(&mut b)
            .map_err(|_| DecodeError::Truncated)?;
        let len = u32::from_be_bytes(b) as usize;
        // Read what is there rather than trusting the length with one allocation.
        let mut data = Vec::with_capacity(len.min(1 << 20));
        (&mut self.inner).take(len as u64).read_to_end(&mut data)?;
        if data.len() != len {
            return Err(DecodeError::Truncated);
        }
        Ok(data)
    }
}

/// A relation as the stream describes it.
#[derive(Debug, Clone)]
pub struct Relation {
    /// `"schema"."name"`, quoted.
    pub name: String,
    pub columns: Vec<Column>,
}

#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    /// Part of the replica identity key.
    pub key: bool,
    pub type_oid: u32,
}

/// One column's value in a change.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    /// A TOASTed value the change did not touch: not sent, left as it is.
    Unchanged,
    Text(String),
}

/// The old row of an UPDATE or DELETE: its key columns, or the whole row (REPLICA IDENTITY
/// FULL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKind {
    Key,
    Full,
}

#[derive(Debug, Clone)]
pub enum Message {
    Begin {
        /// The LSN of the transaction's commit record.
        final_lsn: u64,
        xid: u32,
        commit_at: Option<Timestamp>,
    },
    Commit {
        commit_lsn: u64,
        end_lsn: u64,
        commit_at: Option<Timestamp>,
    },
    Relation {
        id: u32,
        relation: Relation,
    },
    Insert {
        relation: u32,
        new: Vec<Value>,
    },
    Update {
        relation: u32,
        old: Option<(OldKind, Vec<Value>)>,
        new: Vec<Value>,
    },
    Delete {
        relation: u32,
        old: (OldKind, Vec<Value>),
    },
    Truncate {
        relations: Vec<u32>,
        cascade: bool,
        restart_identity: bool,
    },
    /// Type, Origin and logical messages: nothing to replay.
    Other,
}

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

fn pg_timestamp(micros: i64) -> Option<Timestamp> {
    Timestamp::from_microsecond(micros.checked_add(PG_EPOCH_OFFSET_MICROS)?).ok()
}

struct Cursor<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.data.len())
            .ok_or_else(|| DecodeError::BadMessage("shorter than its fields".into()))?;
        let s = &self.data[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn cstr(&mut self) -> Result<String, DecodeError> {
        let rest = &self.data[self.at..];
        let len = rest
            .iter()
            .position(|b| *b == 0)
            .ok_or_else(|| DecodeError::BadMessage("unterminated string".into()))?;
        let s = String::from_utf8_lossy(&rest[..len]).into_owned();
        self.at += len + 1;
        Ok(s)
    }
    fn tuple(&mut self) -> Result<Vec<Value>, DecodeError> {
        let n = self.u16()?;
        let mut values = Vec::with_capacity(n as usize);
        for _ in 0..n {
            values.push(match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                b't' => {
                    let len = self.u32()? as usize;
                    Value::Text(String::from_utf8_lossy(self.take(len)?).into_owned())
                }
                b'b' => {
                    return Err(DecodeError::BadMessage(
                        "binary column values (dr asks for text)".into(),
                    ))
                }
                other => return Err(DecodeError::BadMessage(format!("column kind {other:#04x}"))),
            });
        }
        Ok(values)
    }
}

/// Parses one `pgoutput` message (protocol version 1).
pub fn parse(data: &[u8]) -> Result<Message, DecodeError> {
    let mut c = Cursor { data, at: 1 };
    Ok(match data.first() {
        Some(b'B') => {
            let final_lsn = c.u64()?;
            let commit_at = pg_timestamp(c.u64()? as i64);
            let xid = c.u32()?;
            Message::Begin {
                final_lsn,
                xid,
                commit_at,
            }
        }
        Some(b'C') => {
            let _flags = c.u8()?;
            let commit_lsn = c.u64()?;
            let end_lsn = c.u64()?;
            let commit_at = pg_timestamp(c.u64()? as i64);
            Message::Commit {
                commit_lsn,
                end_lsn,
                commit_at,
            }
        }
        Some(b'R') => {
            let id = c.u32()?;
            let namespace = c.cstr()?;
            let name = c.cstr()?;
            let _identity = c.u8()?;
            let n = c.u16()?;
            let mut columns = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let flags = c.u8()?;
                let name = c.cstr()?;
                let type_oid = c.u32()?;
                let _typmod = c.u32()?;
                columns.push(Column {
                    name,
                    key: flags & 1 == 1,
                    type_oid,
                });
            }
            // pgoutput sends an empty namespace for pg_catalog.
            let namespace = if namespace.is_empty() {
                "pg_catalog".to_string()
            } else {
                namespace
            };
            Message::Relation {
                id,
                relation: Relation {
                    name: format!("{}.{}", quote_ident(&namespace), quote_ident(&name)),
                    columns,
                },
            }
        }
        Some(b'I') => {
            let relation = c.u32()?;
            expect(&mut c, b'N')?;
            Message::Insert {
                relation,
                new: c.tuple()?,
            }
        }
        Some(b'U') => {
            let relation = c.u32()?;
            let mut old = None;
            let mut kind = c.u8()?;
            if kind == b'K' || kind == b'O' {
                let k = if kind == b'K' {
                    OldKind::Key
                } else {
                    OldKind::Full
                };
                old = Some((k, c.tuple()?));
                kind = c.u8()?;
            }
            if kind != b'N' {
                return Err(DecodeError::BadMessage("UPDATE without a new row".into()));
            }
            Message::Update {
                relation,
                old,
                new: c.tuple()?,
            }
        }
        Some(b'D') => {
            let relation = c.u32()?;
            let kind = match c.u8()? {
                b'K' => OldKind::Key,
                b'O' => OldKind::Full,
                other => {
                    return Err(DecodeError::BadMessage(format!(
                        "DELETE with old-row kind {other:#04x}"
                    )))
                }
            };
            Message::Delete {
                relation,
                old: (kind, c.tuple()?),
            }
        }
        Some(b'T') => {
            let n = c.u32()?;
            let options = c.u8()?;
            let mut relations = Vec::with_capacity(n as usize);
            for _ in 0..n {
                relations.push(c.u32()?);
            }
            Message::Truncate {
                relations,
                cascade: options & 1 != 0,
                restart_identity: options & 2 != 0,
            }
        }
        Some(b'Y') | Some(b'O') | Some(b'M') => Message::Other,
        Some(other) => {
            return Err(DecodeError::BadMessage(format!(
                "unknown message type {other:#04x}"
            )))
        }
        None => return Err(DecodeError::BadMessage("empty".into())),
    })
}

fn expect(c: &mut Cursor<'_>, tag: u8) -> Result<(), DecodeError> {
    match c.u8()? {
        t if t == tag => Ok(()),
        other => Err(DecodeError::BadMessage(format!(
            "expected {:?}, found {other:#04x}",
            tag as char
        ))),
    }
}

/// Types that may lack an equality operator: a whole-row match compares their text (as
/// pgoutput sent it, output under the same session settings) instead.
fn needs_text_compare(type_oid: u32) -> bool {
    // json, xml, point, lseg, box, path, polygon, circle, line, jsonpath, then their arrays;
    // and every user-defined type (OIDs from 16384: composites, domains, enums, extension
    // types), which may hold one of those or define no equality at all.
    matches!(
        type_oid,
        114 | 142 | 600 | 601 | 603 | 602 | 604 | 718 | 628 | 4072
    ) || matches!(
        type_oid,
        199 | 143 | 1017 | 1018 | 1020 | 1019 | 1027 | 719 | 629 | 4073
    ) || type_oid >= 16384
}

/// The relations seen so far in the stream, to turn changes into SQL.
#[derive(Default)]
pub struct Replayer {
    relations: HashMap<u32, Relation>,
}

impl Replayer {
    /// Records a Relation message; returns SQL for a change, `None` for anything else.
    pub fn sql(&mut self, message: &Message) -> Result<Option<String>, DecodeError> {
        Ok(Some(match message {
            Message::Relation { id, relation } => {
                self.relations.insert(*id, relation.clone());
                return Ok(None);
            }
            Message::Insert { relation, new } => {
                let rel = self.relation_for(*relation, &[new])?;
                let (cols, vals): (Vec<String>, Vec<String>) = rel
                    .columns
                    .iter()
                    .zip(new)
                    .filter(|(_, v)| **v != Value::Unchanged)
                    .map(|(c, v)| (quote_ident(&c.name), literal(v)))
                    .unzip();
                format!(
                    "INSERT INTO {} ({}) VALUES ({})",
                    rel.name,
                    cols.join(", "),
                    vals.join(", ")
                )
            }
            Message::Update { relation, old, new } => {
                let mut rows: Vec<&[Value]> = vec![new];
                rows.extend(old.as_ref().map(|(_, o)| o.as_slice()));
                let rel = self.relation_for(*relation, &rows)?;
                let set: Vec<String> = rel
                    .columns
                    .iter()
                    .zip(new)
                    .filter(|(_, v)| **v != Value::Unchanged)
                    .map(|(c, v)| format!("{} = {}", quote_ident(&c.name), literal(v)))
                    .collect();
                let target = match old {
                    Some((kind, values)) => row_match(rel, *kind, values)?,
                    // The key did not change: the new row's key columns find it.
                    None => row_match(rel, OldKind::Key, new)?,
                };
                format!("UPDATE {} SET {} WHERE {target}", rel.name, set.join(", "))
            }
            Message::Delete { relation, old } => {
                let rel = self.relation_for(*relation, &[&old.1])?;
                format!(
                    "DELETE FROM {} WHERE {}",
                    rel.name,
                    row_match(rel, old.0, &old.1)?
                )
            }
            Message::Truncate {
                relations,
                cascade,
                restart_identity,
            } => {
                let names: Result<Vec<String>, DecodeError> = relations
                    .iter()
                    .map(|r| self.relation(*r).map(|r| r.name.clone()))
                    .collect();
                format!(
                    "TRUNCATE {}{}{}",
                    names?.join(", "),
                    if *restart_identity {
                        " RESTART IDENTITY"
                    } else {
                        ""
                    },
                    if *cascade { " CASCADE" } else { "" }
                )
            }
            Message::Begin { .. } | Message::Commit { .. } | Message::Other => return Ok(None),
        }))
    }

    fn relation(&self, id: u32) -> Result<&Relation, DecodeError> {
        self.relations
            .get(&id)
            .ok_or(DecodeError::UnknownRelation(id))
    }

    /// The relation of a change whose rows must have one value per column.
    fn relation_for(&self, id: u32, rows: &[&[Value]]) -> Result<&Relation, DecodeError> {
        let rel = self.relation(id)?;
        if let Some(row) = rows.iter().find(|r| r.len() != rel.columns.len()) {
            return Err(DecodeError::BadMessage(format!(
                "a change to {} has {} values for {} columns",
                rel.name,
                row.len(),
                rel.columns.len()
            )));
        }
        Ok(rel)
    }
}

fn literal(v: &Value) -> String {
    match v {
        Value::Text(t) => quote_literal(t),
        Value::Null | Value::Unchanged => "NULL".into(),
    }
}

/// The WHERE clause finding the one row a change names. By key: the key columns' values.
/// By whole row (no key): the first row equal in every column sent, by `ctid`, so of two
/// identical rows exactly one changes, as on the source.
fn row_match(rel: &Relation, kind: OldKind, values: &[Value]) -> Result<String, DecodeError> {
    let mut conditions = Vec::new();
    for (c, v) in rel.columns.iter().zip(values) {
        let col = quote_ident(&c.name);
        match (kind, v) {
            (OldKind::Key, _) if !c.key => {}
            (OldKind::Full, Value::Unchanged) => {}
            (OldKind::Key, Value::Unchanged) => {
                return Err(DecodeError::BadMessage(format!(
                    "a change to {} names its row by a key column ({col}) whose value it did not carry (an unchanged TOASTed key)",
                    rel.name
                )))
            }
            (_, Value::Null) => conditions.push(format!("{col} IS NULL")),
            (_, Value::Text(t)) if needs_text_compare(c.type_oid) => {
                conditions.push(format!("{col}::text = {}", quote_literal(t)))
            }
            (_, Value::Text(t)) => conditions.push(format!("{col} = {}", quote_literal(t))),
        }
    }
    // Never "every row": a change that names no column names no row.
    if conditions.is_empty() {
        return Err(DecodeError::BadMessage(format!(
            "a change to {} does not say which row it changes",
            rel.name
        )));
    }
    let all = conditions.join(" AND ");
    Ok(match kind {
        OldKind::Key => all,
        OldKind::Full => format!("ctid = (SELECT ctid FROM {} WHERE {all} LIMIT 1)", rel.name),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relation_message() -> Vec<u8> {
        let mut m = vec![b'R'];
        m.extend_from_slice(&16384u32.to_be_bytes());
        m.extend_from_slice(b"odd.schema\0");
        m.extend_from_slice(b"t \"x\"\0");
        m.push(b'd');
        m.extend_from_slice(&2u16.to_be_bytes());
        for (flags, name, oid) in [(1u8, "id", 23u32), (0, "doc", 114)] {
            m.push(flags);
            m.extend_from_slice(name.as_bytes());
            m.push(0);
            m.extend_from_slice(&oid.to_be_bytes());
            m.extend_from_slice(&(-1i32).to_be_bytes());
        }
        m
    }

    fn tuple(values: &[Option<&str>]) -> Vec<u8> {
        let mut t = (values.len() as u16).to_be_bytes().to_vec();
        for v in values {
            match v {
                None => t.push(b'n'),
                Some(s) => {
                    t.push(b't');
                    t.extend_from_slice(&(s.len() as u32).to_be_bytes());
                    t.extend_from_slice(s.as_bytes());
                }
            }
        }
        t
    }

    #[test]
    fn postgres_timestamps_convert() {
        assert_eq!(
            pg_timestamp(0).unwrap(),
            "2000-01-01T00:00:00Z".parse::<Timestamp>().unwrap()
        );
    }

    #[test]
    fn changes_become_quoted_sql() {
        let mut r = Replayer::default();
        assert!(r
            .sql(&parse(&relation_message()).unwrap())
            .unwrap()
            .is_none());
        let mut insert = vec![b'I'];
        insert.extend_from_slice(&16384u32.to_be_bytes());
        insert.push(b'N');
        insert.extend(tuple(&[Some("1"), Some("{\"a\": \"it's\"}")]));
        assert_eq!(
            r.sql(&parse(&insert).unwrap()).unwrap().unwrap(),
            r#"INSERT INTO "odd.schema"."t ""x""" ("id", "doc") VALUES ('1', '{"a": "it''s"}')"#
        );
        let mut delete = vec![b'D'];
        delete.extend_from_slice(&16384u32.to_be_bytes());
        delete.push(b'O');
        delete.extend(tuple(&[Some("1"), None]));
        assert_eq!(
            r.sql(&parse(&delete).unwrap()).unwrap().unwrap(),
            r#"DELETE FROM "odd.schema"."t ""x""" WHERE ctid = (SELECT ctid FROM "odd.schema"."t ""x""" WHERE "id" = '1' AND "doc" IS NULL LIMIT 1)"#
        );
        let mut update = vec![b'U'];
        update.extend_from_slice(&16384u32.to_be_bytes());
        update.push(b'N');
        update.extend(tuple(&[Some("1"), Some("[]")]));
        assert_eq!(
            r.sql(&parse(&update).unwrap()).unwrap().unwrap(),
            r#"UPDATE "odd.schema"."t ""x""" SET "id" = '1', "doc" = '[]' WHERE "id" = '1'"#
        );
    }

    #[test]
    fn a_change_that_names_no_row_is_an_error_never_every_row() {
        let mut r = Replayer::default();
        r.sql(&parse(&relation_message()).unwrap()).unwrap();
        // The key column's value not carried (an unchanged TOASTed key): no guess.
        let update = Message::Update {
            relation: 16384,
            old: None,
            new: vec![Value::Unchanged, Value::Text("[]".into())],
        };
        assert!(r.sql(&update).is_err());
        // A whole-row match with nothing to match on, or the wrong number of values.
        let delete = Message::Delete {
            relation: 16384,
            old: (OldKind::Full, vec![Value::Unchanged, Value::Unchanged]),
        };
        assert!(r.sql(&delete).is_err());
        let short = Message::Insert {
            relation: 16384,
            new: vec![Value::Text("1".into())],
        };
        assert!(r.sql(&short).is_err());
    }

    #[test]
    fn an_unknown_relation_or_a_cut_message_is_an_error() {
        let mut r = Replayer::default();
        let mut insert = vec![b'I'];
        insert.extend_from_slice(&7u32.to_be_bytes());
        insert.push(b'N');
        insert.extend(tuple(&[Some("1")]));
        assert!(matches!(
            r.sql(&parse(&insert).unwrap()),
            Err(DecodeError::UnknownRelation(7))
        ));
        assert!(parse(&insert[..insert.len() - 1]).is_err());
    }

    #[test]
    fn frames_need_the_header_and_the_end_marker() {
        let mut data = MAGIC.to_vec();
        data.push(b'M');
        data.extend_from_slice(&5u64.to_be_bytes());
        data.extend_from_slice(&1u32.to_be_bytes());
        data.push(b'B');
        let mut frames = Frames::new(&data[..]);
        assert!(matches!(
            frames.next_frame().unwrap(),
            Some(Frame::Message { lsn: 5, .. })
        ));
        assert!(matches!(frames.next_frame(), Err(DecodeError::Truncated)));
        data.push(b'E');
        let mut frames = Frames::new(&data[..]);
        frames.next_frame().unwrap();
        assert!(frames.next_frame().unwrap().is_none());
        assert!(matches!(
            Frames::new(&b"nonsense"[..]).next_frame(),
            Err(DecodeError::BadMagic)
        ));
        // A length the input does not hold is an error, not a 4 GiB allocation.
        let mut huge = MAGIC.to_vec();
        huge.push(b'S');
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            Frames::new(&huge[..]).next_frame(),
            Err(DecodeError::Truncated)
        ));
    }
}
