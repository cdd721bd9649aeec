//! The start-up configuration file (`-c/--json`), in SPDK's JSON config format.
//!
//! SPDK's format is what `save_config` writes:
//!
//! ```json
//! {"subsystems": [
//!   {"subsystem": "bdev", "config": [
//!     {"method": "bdev_malloc_create", "params": {"name": "Malloc0", "num_blocks": 131072, "block_size": 512}}]},
//!   {"subsystem": "vhost_blk", "config": [
//!     {"method": "vhost_create_blk_controller", "params": {"ctrlr": "vhost.0", "dev_name": "Malloc0"}}]}
//! ]}
//! ```
//!
//! A bare list of `{"method", "params"}` objects is accepted too. Every entry is run, in order,
//! through the same dispatcher as JSON-RPC requests. Subsystems run in file order, except that the
//! vhost subsystems run after the others, because their controllers need the bdevs (SPDK
//! initialises subsystems in dependency order regardless of the file's order). A subsystem whose
//! `config` is `null` (as `save_config` writes for subsystems with nothing to save) is skipped.

use serde_json::Value;

/// One method call from the configuration file.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigCall {
    /// The RPC method.
    pub method: String,
    /// Its parameters, if any.
    pub params: Option<Value>,
    /// Where it came from, for error messages (`subsystem bdev, entry 2`).
    pub origin: String,
}

/// Why a configuration file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The text is not JSON.
    #[error("not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The JSON is not in SPDK's config format.
    #[error("{0}")]
    Format(String),
}

fn format_error(message: impl Into<String>) -> ConfigError {
    ConfigError::Format(message.into())
}

/// Parses a configuration file's text into the calls to make, in order.
pub fn parse(text: &str) -> Result<Vec<ConfigCall>, ConfigError> {
    match serde_json::from_str::<Value>(text)? {
        Value::Array(entries) => entries_of(&entries, "the list"),
        Value::Object(mut top) => {
            let subsystems = match top.remove("subsystems") {
                Some(Value::Array(subsystems)) => subsystems,
                Some(_) => return Err(format_error("`subsystems` must be an array")),
                None => {
                    return Err(format_error(
                        "expected {\"subsystems\": [...]} (SPDK's JSON config) or a list of \
                         {\"method\", \"params\"} objects",
                    ))
                }
            };
            if let Some(other) = top.keys().next() {
                return Err(format_error(format!(
                    "unexpected top-level member `{other}`"
                )));
            }
            let mut ordered: Vec<(usize, &str, &Value)> = Vec::with_capacity(subsystems.len());
            for (index, subsystem) in subsystems.iter().enumerate() {
                let name = subsystem
                    .get("subsystem")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        format_error(format!("subsystems[{index}] has no `subsystem` name"))
                    })?;
                let config = subsystem.get("config").unwrap_or(&Value::Null);
                ordered.push((index, name, config));
            }
            ordered.sort_by_key(|(index, name, _)| (name.starts_with("vhost"), *index));
            let mut calls = Vec::new();
            for (_, name, config) in ordered {
                match config {
                    Value::Null => {}
                    Value::Array(entries) => {
                        calls.extend(entries_of(entries, &format!("subsystem {name}"))?)
                    }
                    _ => {
                        return Err(format_error(format!(
                            "subsystem {name}: `config` must be an array or null"
                        )))
                    }
                }
            }
            Ok(calls)
        }
        _ => Err(format_error(
            "the configuration must be a JSON object or array",
        )),
    }
}

fn entries_of(entries: &[Value], place: &str) -> Result<Vec<ConfigCall>, ConfigError> {
    let mut calls = Vec::with_capacity(entries.len());
    for (index, entry) in entries.iter().enumerate() {
        match entry {
            // Newer SPDK saves independent calls as batch arrays; they run in order like the rest.
            Value::Array(batch) => {
                for (inner, item) in batch.iter().enumerate() {
                    calls.push(call_of(item, format!("{place}, entry {index}.{inner}"))?);
                }
            }
            single => calls.push(call_of(single, format!("{place}, entry {index}"))?),
        }
    }
    Ok(calls)
}

fn call_of(entry: &Value, origin: String) -> Result<ConfigCall, ConfigError> {
    let Value::Object(object) = entry else {
        return Err(format_error(format!(
            "{origin}: must be a {{\"method\", \"params\"}} object"
        )));
    };
    let method = object
        .get("method")
        .and_then(Value::as_str)
        .ok_or_else(|| format_error(format!("{origin}: `method` is missing or not a string")))?;
    if let Some(other) = object.keys().find(|k| *k != "method" && *k != "params") {
        return Err(format_error(format!(
            "{origin}: unexpected member `{other}`"
        )));
    }
    Ok(ConfigCall {
        method: method.to_owned(),
        params: object.get("params").cloned(),
        origin,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_spdk_config_with_vhost_after_bdevs() {
        let text = r#"{"subsystems": [
            {"subsystem": "vhost_blk", "config": [
                {"method": "vhost_create_blk_controller", "params": {"ctrlr": "vhost.0", "dev_name": "Malloc0"}}]},
            {"subsystem": "scheduler", "config": null},
            {"subsystem": "bdev", "config": [
                {"method": "bdev_malloc_create", "params": {"name": "Malloc0", "num_blocks": 8, "block_size": 512}},
                {"method": "bdev_wait_for_examine"}]}
        ]}"#;
        let calls = parse(text).unwrap();
        let methods: Vec<_> = calls.iter().map(|c| c.method.as_str()).collect();
        assert_eq!(
            methods,
            [
                "bdev_malloc_create",
                "bdev_wait_for_examine",
                "vhost_create_blk_controller"
            ]
        );
        assert_eq!(
            calls[0].params,
            Some(json!({"name": "Malloc0", "num_blocks": 8, "block_size": 512}))
        );
        assert_eq!(calls[1].params, None);
        assert_eq!(calls[2].origin, "subsystem vhost_blk, entry 0");
    }

    #[test]
    fn flattens_batches() {
        let calls =
            parse(r#"[{"method": "a"}, [{"method": "b"}, {"method": "c"}], {"method": "d"}]"#)
                .unwrap();
        let methods: Vec<_> = calls.iter().map(|c| c.method.as_str()).collect();
        assert_eq!(methods, ["a", "b", "c", "d"]);
        assert_eq!(calls[2].origin, "the list, entry 1.1");
        assert!(parse(r#"[[{"method": "a"}, 5]]"#)
            .unwrap_err()
            .to_string()
            .contains("entry 0.1"));
    }

    #[test]
    fn reads_a_bare_list() {
        let calls = parse(r#"[{"method": "a", "params": {"x": 1}}, {"method": "b"}]"#).unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1].origin, "the list, entry 1");
    }

    #[test]
    fn explains_what_is_wrong() {
        for (text, needle) in [
            ("{", "not valid JSON"),
            ("{}", "expected"),
            (r#"{"subsystems": {}}"#, "must be an array"),
            (
                r#"{"subsystems": [], "x": 1}"#,
                "unexpected top-level member `x`",
            ),
            (r#"{"subsystems": [{"config": []}]}"#, "no `subsystem` name"),
            (
                r#"{"subsystems": [{"subsystem": "bdev", "config": 5}]}"#,
                "array or null",
            ),
            (r#"[{"params": {}}]"#, "`method` is missing"),
            (
                r#"[{"method": "a", "parms": {}}]"#,
                "unexpected member `parms`",
            ),
            ("[1]", "entry 0"),
            ("7", "JSON object or array"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
