//! Rebuilds [`Event`]s from rows of the events table (the inverse of the schema builder): used by
//! the profile event listings and by the round-trip tests.

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Int64Type, TimestampMicrosecondType};
use serde_json::{Map, Value};

use super::message::{Event, MessageType};
use crate::error::{Error, Result};

fn str_col<'a>(b: &'a RecordBatch, name: &str) -> Result<&'a arrow::array::StringArray> {
    b.column_by_name(name)
        .and_then(|c| c.as_string_opt::<i32>())
        .ok_or_else(|| Error::Usage(format!("events batch has no utf8 column '{name}'")))
}

fn ts_col<'a>(
    b: &'a RecordBatch,
    name: &str,
) -> Result<&'a arrow::array::TimestampMicrosecondArray> {
    b.column_by_name(name)
        .and_then(|c| c.as_primitive_opt::<TimestampMicrosecondType>())
        .ok_or_else(|| Error::Usage(format!("events batch has no timestamp column '{name}'")))
}

fn opt_str(a: &arrow::array::StringArray, i: usize) -> Option<String> {
    a.is_valid(i).then(|| a.value(i).to_string())
}

fn opt_obj(a: &arrow::array::StringArray, i: usize) -> Result<Option<Map<String, Value>>> {
    if a.is_null(i) {
        return Ok(None);
    }
    match serde_json::from_str(a.value(i))? {
        Value::Object(m) => Ok(Some(m)),
        _ => Err(Error::Usage("stored JSON column is not an object".into())),
    }
}

/// The events of a batch with the table's fixed columns.
pub fn events_from_batch(b: &RecordBatch) -> Result<Vec<Event>> {
    let [mid, ty, ev, name, uid, aid, gid, pid] = [
        "message_id",
        "type",
        "event",
        "name",
        "user_id",
        "anonymous_id",
        "group_id",
        "previous_id",
    ]
    .map(|n| str_col(b, n));
    let (mid, ty, ev, name, uid, aid, gid, pid) = (mid?, ty?, ev?, name?, uid?, aid?, gid?, pid?);
    let [props, traits, ctx, integ, extra] =
        ["properties", "traits", "context", "integrations", "extra"].map(|n| str_col(b, n));
    let (props, traits, ctx, integ, extra) = (props?, traits?, ctx?, integ?, extra?);
    let ts = ts_col(b, "timestamp")?;
    let ots = ts_col(b, "original_timestamp")?;
    let sent = ts_col(b, "sent_at")?;
    let recv = ts_col(b, "received_at")?;
    let _ = b
        .column_by_name("identity_key")
        .and_then(|c| c.as_primitive_opt::<Int64Type>());
    let mut out = Vec::with_capacity(b.num_rows());
    for i in 0..b.num_rows() {
        let kind = MessageType::parse(ty.value(i)).ok_or_else(|| {
            Error::Usage(format!("stored event has unknown type '{}'", ty.value(i)))
        })?;
        out.push(Event {
            message_id: mid.value(i).to_string(),
            kind,
            event: opt_str(ev, i),
            name: opt_str(name, i),
            user_id: opt_str(uid, i),
            anonymous_id: opt_str(aid, i),
            group_id: opt_str(gid, i),
            previous_id: opt_str(pid, i),
            timestamp: ts.value(i),
            original_timestamp: ots.is_valid(i).then(|| ots.value(i)),
            sent_at: sent.is_valid(i).then(|| sent.value(i)),
            received_at: recv.value(i),
            properties: opt_obj(props, i)?,
            traits: opt_obj(traits, i)?,
            context: opt_obj(ctx, i)?,
            integrations: opt_obj(integ, i)?,
            extra: opt_obj(extra, i)?.unwrap_or_default(),
        });
    }
    Ok(out)
}

/// Segment-spec JSON messages from a record batch sent by a client (Flight `do_put`): the
/// columns of the events table that are present (`message_id`, `type`, `event`, `name`,
/// `user_id`, `anonymous_id`, `group_id`, `previous_id`, the timestamps as timestamps or RFC 3339
/// text, and `properties`, `traits`, `context`, `integrations` as JSON text). Each message is then
/// validated like any other; a column of the wrong type fails the batch with its name.
pub fn messages_from_batch(b: &RecordBatch) -> Result<Vec<Value>> {
    use arrow::datatypes::{DataType, TimeUnit};
    let text = [
        ("message_id", "messageId"),
        ("type", "type"),
        ("event", "event"),
        ("name", "name"),
        ("user_id", "userId"),
        ("anonymous_id", "anonymousId"),
        ("group_id", "groupId"),
        ("previous_id", "previousId"),
    ];
    let times = [
        ("timestamp", "timestamp"),
        ("original_timestamp", "originalTimestamp"),
        ("sent_at", "sentAt"),
        ("received_at", "receivedAt"),
    ];
    let objects = [
        ("properties", "properties"),
        ("traits", "traits"),
        ("context", "context"),
        ("integrations", "integrations"),
    ];
    let mut out: Vec<Map<String, Value>> = vec![Map::new(); b.num_rows()];
    let utf8 = |col: &str| -> Result<Option<arrow::array::StringArray>> {
        let Some(c) = b.column_by_name(col) else {
            return Ok(None);
        };
        match c.data_type() {
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View | DataType::Null => {
                let c = arrow::compute::cast(c, &DataType::Utf8)?;
                Ok(Some(c.as_string::<i32>().clone()))
            }
            t => Err(Error::Usage(format!(
                "column '{col}' must be text, not {t}"
            ))),
        }
    };
    for (col, field) in text {
        if let Some(a) = utf8(col)? {
            for (i, m) in out.iter_mut().enumerate() {
                if a.is_valid(i) {
                    m.insert(field.into(), Value::String(a.value(i).to_string()));
                }
            }
        }
    }
    for (col, field) in times {
        let Some(c) = b.column_by_name(col) else {
            continue;
        };
        match c.data_type() {
            DataType::Timestamp(..) => {
                let us = arrow::compute::cast(
                    c,
                    &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                )?;
                let us = us.as_primitive::<TimestampMicrosecondType>();
                for (i, m) in out.iter_mut().enumerate() {
                    if us.is_valid(i) {
                        m.insert(
                            field.into(),
                            Value::String(super::message::format_timestamp(us.value(i))),
                        );
                    }
                }
            }
            _ => {
                if let Some(a) = utf8(col)? {
                    for (i, m) in out.iter_mut().enumerate() {
                        if a.is_valid(i) {
                            m.insert(field.into(), Value::String(a.value(i).to_string()));
                        }
                    }
                }
            }
        }
    }
    for (col, field) in objects {
        if let Some(a) = utf8(col)? {
            for (i, m) in out.iter_mut().enumerate() {
                if a.is_valid(i) {
                    // not JSON: kept as text, so validation names the field
                    let v = serde_json::from_str(a.value(i))
                        .unwrap_or_else(|_| Value::String(a.value(i).to_string()));
                    m.insert(field.into(), v);
                }
            }
        }
    }
    Ok(out.into_iter().map(Value::Object).collect())
}
