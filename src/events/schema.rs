//! The events table's Arrow schema, and the builder that turns [`Event`]s into record batches.
//!
//! Fixed columns hold the Segment fields; `properties`, `traits`, `context`, `integrations` and
//! `extra` keep the original JSON. On top of that, every leaf of `properties` and `context` is
//! shredded into a typed column named after its dotted path and JSON type:
//! `properties.price:num` (Float64), `properties.plan:str` (Utf8), `properties.beta:bool`
//! (Boolean), `properties.tags:json` (arrays, as JSON text). A property that is a number in one
//! event and a string in another lands in two columns, so type conflicts never fail a scan, and a
//! condition reads the column of its literal's type without parsing JSON.

use std::sync::{Arc, LazyLock};

use arrow::array::{
    ArrayRef, BooleanBuilder, Float64Builder, Int64Builder, RecordBatch, StringBuilder,
    TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use serde_json::{Map, Value};

use super::message::Event;
use crate::store::log::ColumnSpec;

/// At most this many shredded columns per batch; further leaves stay in the JSON columns only.
pub const MAX_DYNAMIC_COLUMNS: usize = 1024;

/// The UTC microsecond timestamp type used for every time column.
pub fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// The fixed columns of the events table, in order (the partition column `date` is not stored
/// in files).
pub static FIXED_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let s = |n: &str, null: bool| Field::new(n, DataType::Utf8, null);
    Arc::new(Schema::new(vec![
        s("message_id", false),
        s("type", false),
        s("event", true),
        s("name", true),
        s("user_id", true),
        s("anonymous_id", true),
        s("group_id", true),
        s("previous_id", true),
        Field::new("identity_key", DataType::Int64, false),
        Field::new("timestamp", ts_type(), false),
        Field::new("original_timestamp", ts_type(), true),
        Field::new("sent_at", ts_type(), true),
        Field::new("received_at", ts_type(), false),
        s("properties", true),
        s("traits", true),
        s("context", true),
        s("integrations", true),
        s("extra", true),
    ]))
});

/// The Arrow type of a shredded column kind.
pub fn dynamic_type(kind: &str) -> DataType {
    match kind {
        "float64" => DataType::Float64,
        "boolean" => DataType::Boolean,
        _ => DataType::Utf8,
    }
}

/// The full file schema for a set of dynamic columns (fixed columns, then dynamic ones sorted).
pub fn schema_with(columns: &[ColumnSpec]) -> SchemaRef {
    let mut fields: Vec<Field> = FIXED_SCHEMA
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    let mut cols = columns.to_vec();
    cols.sort();
    cols.dedup();
    for c in cols {
        fields.push(Field::new(&c.name, dynamic_type(&c.kind), true));
    }
    Arc::new(Schema::new(fields))
}

/// The column name a query uses for a property (or context) path and value type.
pub fn dynamic_column(prefix: &str, path: &str, kind: LeafKind) -> String {
    format!("{prefix}.{path}:{}", kind.suffix())
}

/// The JSON type of a shredded leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeafKind {
    /// String values.
    Str,
    /// Numbers (as Float64).
    Num,
    /// Booleans.
    Bool,
    /// Arrays, as JSON text.
    Json,
}

impl LeafKind {
    /// Column-name suffix.
    pub fn suffix(self) -> &'static str {
        match self {
            LeafKind::Str => "str",
            LeafKind::Num => "num",
            LeafKind::Bool => "bool",
            LeafKind::Json => "json",
        }
    }
}

/// The 64-bit identity key of an event's primary identity (`userId`, else `anonymousId`):
/// a hash, so ingest needs no coordination and events never need rewriting.
pub fn identity_key(id_type: &str, value: &str) -> i64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(id_type.as_bytes());
    h.update(&[0]);
    h.update(value.as_bytes());
    h.digest() as i64
}

enum DynBuilder {
    Str(StringBuilder),
    Num(Float64Builder),
    Bool(BooleanBuilder),
}

impl DynBuilder {
    fn len(&self) -> usize {
        use arrow::array::ArrayBuilder;
        match self {
            DynBuilder::Str(b) => b.len(),
            DynBuilder::Num(b) => b.len(),
            DynBuilder::Bool(b) => b.len(),
        }
    }
    fn append_null(&mut self) {
        match self {
            DynBuilder::Str(b) => b.append_null(),
            DynBuilder::Num(b) => b.append_null(),
            DynBuilder::Bool(b) => b.append_null(),
        }
    }
    fn kind(&self) -> &'static str {
        match self {
            DynBuilder::Str(_) => "utf8",
            DynBuilder::Num(_) => "float64",
            DynBuilder::Bool(_) => "boolean",
        }
    }
    fn finish(&mut self) -> ArrayRef {
        match self {
            DynBuilder::Str(b) => Arc::new(b.finish()),
            DynBuilder::Num(b) => Arc::new(b.finish()),
            DynBuilder::Bool(b) => Arc::new(b.finish()),
        }
    }
}

/// A shredded leaf value.
#[derive(Debug, Clone, PartialEq)]
pub enum Leaf {
    /// String value.
    Str(String),
    /// Number.
    Num(f64),
    /// Boolean.
    Bool(bool),
    /// Array, as JSON text.
    Json(String),
}

impl Leaf {
    fn kind(&self) -> LeafKind {
        match self {
            Leaf::Str(_) => LeafKind::Str,
            Leaf::Num(_) => LeafKind::Num,
            Leaf::Bool(_) => LeafKind::Bool,
            Leaf::Json(_) => LeafKind::Json,
        }
    }
}

/// An event prepared for the columnar builder: JSON columns serialized, leaves shredded and
/// the identity key computed. Preparing is the expensive part of ingest and runs in parallel;
/// appending a row is a copy.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// `messageId`.
    pub message_id: String,
    /// Message type.
    pub kind: super::message::MessageType,
    /// Fixed string columns after message_id and type: event, name, user_id, anonymous_id,
    /// group_id, previous_id.
    pub strs: [Option<String>; 6],
    /// Hash of the primary identity.
    pub identity_key: i64,
    /// Event time.
    pub timestamp: i64,
    /// `originalTimestamp`.
    pub original_timestamp: Option<i64>,
    /// `sentAt`.
    pub sent_at: Option<i64>,
    /// `receivedAt`.
    pub received_at: i64,
    /// JSON text of properties, traits, context, integrations, extra.
    pub json: [Option<String>; 5],
    /// Shredded leaves: (column name, value), first occurrence of a name wins.
    pub leaves: Vec<(String, Leaf)>,
}

impl Row {
    /// Prepare an event.
    pub fn from_event(e: Event) -> Row {
        let (id_type, id_value) = e.primary_identity();
        let identity_key = identity_key(id_type, id_value);
        let mut leaves = Vec::new();
        let mut path = String::new();
        if let Some(p) = &e.properties {
            shred_into("properties", &mut path, p, &mut leaves);
        }
        if let Some(c) = &e.context {
            path.clear();
            shred_into("context", &mut path, c, &mut leaves);
        }
        let ser = |m: Option<&Map<String, Value>>| m.map(|m| Value::Object(m.clone()).to_string());
        let json = [
            e.properties
                .as_ref()
                .map(|m| serde_json::to_string(m).unwrap_or_default()),
            e.traits
                .as_ref()
                .map(|m| serde_json::to_string(m).unwrap_or_default()),
            e.context
                .as_ref()
                .map(|m| serde_json::to_string(m).unwrap_or_default()),
            e.integrations
                .as_ref()
                .map(|m| serde_json::to_string(m).unwrap_or_default()),
            ser((!e.extra.is_empty()).then_some(&e.extra)),
        ];
        Row {
            message_id: e.message_id,
            kind: e.kind,
            strs: [
                e.event,
                e.name,
                e.user_id,
                e.anonymous_id,
                e.group_id,
                e.previous_id,
            ],
            identity_key,
            timestamp: e.timestamp,
            original_timestamp: e.original_timestamp,
            sent_at: e.sent_at,
            received_at: e.received_at,
            json,
            leaves,
        }
    }
}

fn shred_into(
    prefix: &str,
    path: &mut String,
    obj: &Map<String, Value>,
    out: &mut Vec<(String, Leaf)>,
) {
    for (k, v) in obj {
        let len = path.len();
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(k);
        let leaf = match v {
            Value::Object(m) => {
                shred_into(prefix, path, m, out);
                None
            }
            Value::Null => None,
            Value::String(s) => Some(Leaf::Str(s.clone())),
            Value::Number(n) => n.as_f64().map(Leaf::Num),
            Value::Bool(b) => Some(Leaf::Bool(*b)),
            Value::Array(_) => Some(Leaf::Json(v.to_string())),
        };
        if let Some(leaf) = leaf {
            out.push((dynamic_column(prefix, path, leaf.kind()), leaf));
        }
        path.truncate(len);
    }
}

/// Builds a record batch of events, growing shredded columns as new paths appear.
pub struct EventBatchBuilder {
    rows: usize,
    strs: [StringBuilder; 8],
    identity_key: Int64Builder,
    timestamp: TimestampMicrosecondBuilder,
    original_timestamp: TimestampMicrosecondBuilder,
    sent_at: TimestampMicrosecondBuilder,
    received_at: TimestampMicrosecondBuilder,
    json: [StringBuilder; 5],
    dynamic: hashbrown::HashMap<String, DynBuilder>,
}

impl Default for EventBatchBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBatchBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        EventBatchBuilder {
            rows: 0,
            strs: Default::default(),
            identity_key: Int64Builder::new(),
            timestamp: TimestampMicrosecondBuilder::new(),
            original_timestamp: TimestampMicrosecondBuilder::new(),
            sent_at: TimestampMicrosecondBuilder::new(),
            received_at: TimestampMicrosecondBuilder::new(),
            json: Default::default(),
            dynamic: hashbrown::HashMap::new(),
        }
    }

    /// Rows appended so far.
    pub fn len(&self) -> usize {
        self.rows
    }

    /// True when no rows were appended.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Append one event.
    pub fn append(&mut self, e: &Event) {
        self.append_row(&Row::from_event(e.clone()));
    }

    /// Append one prepared row.
    pub fn append_row(&mut self, r: &Row) {
        self.strs[0].append_value(&r.message_id);
        self.strs[1].append_value(r.kind.as_str());
        for (b, v) in self.strs[2..].iter_mut().zip(&r.strs) {
            b.append_option(v.as_deref());
        }
        self.identity_key.append_value(r.identity_key);
        self.timestamp.append_value(r.timestamp);
        self.original_timestamp.append_option(r.original_timestamp);
        self.sent_at.append_option(r.sent_at);
        self.received_at.append_value(r.received_at);
        for (b, v) in self.json.iter_mut().zip(&r.json) {
            b.append_option(v.as_deref());
        }
        let row = self.rows;
        for (name, leaf) in &r.leaves {
            let Some(b) = self.column(name, leaf.kind(), row) else {
                continue;
            };
            match (b, leaf) {
                (DynBuilder::Str(b), Leaf::Str(s) | Leaf::Json(s)) => b.append_value(s),
                (DynBuilder::Num(b), Leaf::Num(x)) => b.append_value(*x),
                (DynBuilder::Bool(b), Leaf::Bool(x)) => b.append_value(*x),
                _ => {}
            }
        }
        self.rows += 1;
        for b in self.dynamic.values_mut() {
            if b.len() < self.rows {
                b.append_null();
            }
        }
    }

    /// The builder of a shredded column, created (null-padded) on first use; None when the
    /// column cap is reached or the row already has a value (first leaf wins on a path clash).
    fn column(&mut self, name: &str, kind: LeafKind, row: usize) -> Option<&mut DynBuilder> {
        if !self.dynamic.contains_key(name) {
            if self.dynamic.len() >= MAX_DYNAMIC_COLUMNS {
                return None;
            }
            let mut b = match kind {
                LeafKind::Str | LeafKind::Json => DynBuilder::Str(StringBuilder::new()),
                LeafKind::Num => DynBuilder::Num(Float64Builder::new()),
                LeafKind::Bool => DynBuilder::Bool(BooleanBuilder::new()),
            };
            for _ in 0..row {
                b.append_null();
            }
            self.dynamic.insert(name.to_string(), b);
        }
        let b = self.dynamic.get_mut(name)?;
        (b.len() == row).then_some(b)
    }

    /// Finish into a batch (fixed columns, then shredded columns sorted by name) and the
    /// shredded column specs.
    pub fn finish(mut self) -> arrow::error::Result<(RecordBatch, Vec<ColumnSpec>)> {
        let mut cols: Vec<ArrayRef> = Vec::with_capacity(18 + self.dynamic.len());
        for b in self.strs.iter_mut() {
            cols.push(Arc::new(b.finish()));
        }
        cols.push(Arc::new(self.identity_key.finish()));
        for b in [
            &mut self.timestamp,
            &mut self.original_timestamp,
            &mut self.sent_at,
            &mut self.received_at,
        ] {
            cols.push(Arc::new(b.finish().with_timezone("UTC")));
        }
        for b in self.json.iter_mut() {
            cols.push(Arc::new(b.finish()));
        }
        let mut specs = Vec::with_capacity(self.dynamic.len());
        let mut dynamic: Vec<(&String, &mut DynBuilder)> = self.dynamic.iter_mut().collect();
        dynamic.sort_by(|a, b| a.0.cmp(b.0));
        for (name, b) in dynamic {
            specs.push(ColumnSpec {
                name: name.clone(),
                kind: b.kind().to_string(),
            });
            cols.push(b.finish());
        }
        let schema = schema_with(&specs);
        let batch = RecordBatch::try_new(schema, cols)?;
        Ok((batch, specs))
    }
}
