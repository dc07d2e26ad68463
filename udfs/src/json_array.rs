//! `json_array(list)`: a list of strings as JSON array text, e.g. `["books","toys"]` (null for a
//! null list). Computed traits of the `unique(..)` reducer store their value this way, so the
//! trait's JSON value is a real array and string comparators still see the text.
//!
//! ```sql
//! SELECT json_array(make_array('a', 'b"c'))   -- ["a","b\"c"]
//! ```

use std::sync::{Arc, LazyLock};

use arrow::array::{Array, ArrayRef, AsArray, StringBuilder};
use arrow::datatypes::DataType;
use datafusion::common::{exec_err, plan_err};
use datafusion::error::Result;
use datafusion::logical_expr::scalar_doc_sections::DOC_SECTION_STRING;
use datafusion::logical_expr::{
    ColumnarValue, Documentation, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};

/// The `json_array` function.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct JsonArray {
    signature: Signature,
}

impl Default for JsonArray {
    fn default() -> Self {
        Self {
            signature: Signature::any(1, Volatility::Immutable),
        }
    }
}

static DOC: LazyLock<Documentation> = LazyLock::new(|| {
    Documentation::builder(
        DOC_SECTION_STRING,
        "A list of strings as JSON array text (null for a null list; null items become null).",
        "json_array(list)",
    )
    .with_sql_example("SELECT json_array(make_array('a', 'b'))")
    .with_argument("list", "a list of strings")
    .build()
});

fn list_values(a: &ArrayRef, i: usize) -> Option<ArrayRef> {
    if a.is_null(i) {
        return None;
    }
    match a.data_type() {
        DataType::List(_) => Some(a.as_list::<i32>().value(i)),
        DataType::LargeList(_) => Some(a.as_list::<i64>().value(i)),
        DataType::FixedSizeList(..) => Some(a.as_fixed_size_list().value(i)),
        _ => None,
    }
}

impl ScalarUDFImpl for JsonArray {
    fn name(&self) -> &str {
        "json_array"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        match &arg_types[0] {
            DataType::List(_) | DataType::LargeList(_) | DataType::FixedSizeList(..) => {
                Ok(DataType::Utf8)
            }
            DataType::Null => Ok(DataType::Utf8),
            other => plan_err!("json_array takes a list of strings, got {other}"),
        }
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let arr = args.args[0].to_array(args.number_rows)?;
        if arr.data_type() == &DataType::Null {
            return Ok(ColumnarValue::Array(arrow::array::new_null_array(
                &DataType::Utf8,
                arr.len(),
            )));
        }
        let mut out = StringBuilder::new();
        let mut text = String::new();
        for i in 0..arr.len() {
            let Some(items) = list_values(&arr, i) else {
                out.append_null();
                continue;
            };
            let items = arrow::compute::cast(&items, &DataType::Utf8)?;
            let Some(items) = items.as_string_opt::<i32>() else {
                return exec_err!("json_array: list items are not text");
            };
            let values: Vec<Option<&str>> = items.iter().collect();
            text.clear();
            text.push_str(&serde_json::to_string(&values).map_err(|e| {
                datafusion::error::DataFusionError::Execution(format!("json_array: {e}"))
            })?);
            out.append_value(&text);
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
    }
    fn documentation(&self) -> Option<&Documentation> {
        Some(&DOC)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ListBuilder, StringArray};
    use arrow::datatypes::Field;

    #[test]
    fn escapes_and_nulls() {
        let mut b = ListBuilder::new(StringBuilder::new());
        b.values().append_value("a");
        b.values().append_value("q\"uote\n");
        b.append(true);
        b.append(false);
        b.append(true);
        let arr: ArrayRef = Arc::new(b.finish());
        let f = JsonArray::default();
        let out = f
            .invoke_with_args(ScalarFunctionArgs {
                args: vec![ColumnarValue::Array(Arc::clone(&arr))],
                arg_fields: vec![Arc::new(Field::new("l", arr.data_type().clone(), true))],
                number_rows: 3,
                return_field: Arc::new(Field::new("r", DataType::Utf8, true)),
                config_options: Default::default(),
            })
            .unwrap()
            .to_array(3)
            .unwrap();
        let out = out.as_any().downcast_ref::<StringArray>().unwrap();
        assert_eq!(out.value(0), r#"["a","q\"uote\n"]"#);
        assert!(out.is_null(1));
        assert_eq!(out.value(2), "[]");
    }
}
