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
