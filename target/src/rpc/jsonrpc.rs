//! JSON-RPC 2.0 request validation and response building, transport-free.
//!
//! Validation follows SPDK's server: a request is an object with exactly the members `jsonrpc`
//! (`"2.0"`), `method` (a string), and optionally `params` (an object or array) and `id` (a
//! string, number or null). A request without `id` is a notification and gets no reply. Batches
//! (arrays of requests) are answered with an array of the non-notification replies, as the
//! JSON-RPC 2.0 specification and SPDK's client's `--batch-mode` expect.

use serde_json::{json, Map, Value};

use super::{RpcError, INVALID_REQUEST};

/// Something that executes methods.
pub trait Dispatch {
    /// Runs `method` with `params` (as sent: `None` when the request had no `params`).
    fn call(&mut self, method: &str, params: Option<Value>) -> Result<Value, RpcError>;
}

/// Builds a success response.
pub fn result_response(id: Value, result: Value) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "result": result })
}

/// Builds an error response.
pub fn error_response(id: Value, error: &RpcError) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "error": error.to_json() })
}

/// Handles one parsed message (a request or a batch); returns the reply to send, if any.
pub fn handle_message(message: Value, dispatch: &mut dyn Dispatch) -> Option<Value> {
    match message {
        Value::Array(batch) => {
            if batch.is_empty() {
                return Some(error_response(
                    Value::Null,
                    &RpcError::new(INVALID_REQUEST, "Invalid request: the batch is empty"),
                ));
            }
            let replies: Vec<Value> = batch
                .into_iter()
                .filter_map(|request| handle_request(request, dispatch))
                .collect();
            if replies.is_empty() {
                None
            } else {
                Some(Value::Array(replies))
            }
        }
        request => handle_request(request, dispatch),
    }
}

/// A request that passed validation.
struct Request {
    method: String,
    params: Option<Value>,
    /// `None` for a notification.
    id: Option<Value>,
}

fn invalid(reason: impl std::fmt::Display) -> RpcError {
    RpcError::new(INVALID_REQUEST, format!("Invalid request: {reason}"))
}

/// Checks a request's shape. On failure returns the id to answer with (null if it is unusable).
fn validate(request: Value) -> Result<Request, (Value, RpcError)> {
    let Value::Object(mut object) = request else {
        return Err((Value::Null, invalid("a request must be a JSON object")));
    };
    let id = match object.remove("id") {
        None => None,
        Some(id @ (Value::String(_) | Value::Number(_) | Value::Null)) => Some(id),
        Some(_) => {
            return Err((
                Value::Null,
                invalid("`id` must be a string, a number or null"),
            ))
        }
    };
    let reply_id = id.clone().unwrap_or(Value::Null);
    let fail = |reason: String| Err((reply_id.clone(), invalid(reason)));
    match object.remove("jsonrpc") {
        Some(Value::String(version)) if version == "2.0" => {}
        Some(other) => return fail(format!("`jsonrpc` must be \"2.0\", not {other}")),
        None => return fail("the `jsonrpc` member (\"2.0\") is missing".into()),
    }
    let method = match object.remove("method") {
        Some(Value::String(method)) => method,
        Some(_) => return fail("`method` must be a string".into()),
        None => return fail("the `method` member is missing".into()),
    };
    let params = match object.remove("params") {
        None => None,
        Some(params @ (Value::Object(_) | Value::Array(_))) => Some(params),
        Some(_) => return fail("`params` must be an object or an array".into()),
    };
    if let Some(unknown) = first_key(&object) {
        return fail(format!("unexpected member `{unknown}`"));
    }
    Ok(Request { method, params, id })
}

fn first_key(object: &Map<String, Value>) -> Option<&str> {
    object.keys().next().map(String::as_str)
}

fn handle_request(request: Value, dispatch: &mut dyn Dispatch) -> Option<Value> {
    let request = match validate(request) {
        Ok(request) => request,
        Err((id, error)) => return Some(error_response(id, &error)),
    };
    let outcome = dispatch.call(&request.method, request.params);
    let id = request.id?;
    Some(match outcome {
        Ok(result) => result_response(id, result),
        Err(error) => error_response(id, &error),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::METHOD_NOT_FOUND;

    /// Echoes params for `echo`, counts calls, knows no other method.
    #[derive(Default)]
    struct Echo {
        calls: Vec<String>,
    }

    impl Dispatch for Echo {
        fn call(&mut self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
            self.calls.push(method.to_owned());
            match method {
                "echo" => Ok(params.unwrap_or(Value::Null)),
                _ => Err(RpcError::new(METHOD_NOT_FOUND, "Method not found")),
            }
        }
    }

    fn reply(text: &str, echo: &mut Echo) -> Option<Value> {
        handle_message(serde_json::from_str(text).unwrap(), echo)
    }

    #[test]
    fn answers_requests_with_their_id() {
        let mut echo = Echo::default();
        let r = reply(
            r#"{"jsonrpc":"2.0","method":"echo","params":{"a":1},"id":7}"#,
            &mut echo,
        );
        assert_eq!(r, Some(json!({"jsonrpc":"2.0","id":7,"result":{"a":1}})));
        let r = reply(r#"{"jsonrpc":"2.0","method":"nope","id":"x"}"#, &mut echo);
        assert_eq!(
            r,
            Some(
                json!({"jsonrpc":"2.0","id":"x","error":{"code":-32601,"message":"Method not found"}})
            )
        );
        let r = reply(r#"{"jsonrpc":"2.0","method":"echo","id":null}"#, &mut echo);
        assert_eq!(r, Some(json!({"jsonrpc":"2.0","id":null,"result":null})));
    }

    #[test]
    fn notifications_run_but_get_no_reply() {
        let mut echo = Echo::default();
        assert_eq!(
            reply(
                r#"{"jsonrpc":"2.0","method":"echo","params":[1]}"#,
                &mut echo
            ),
            None
        );
        assert_eq!(
            reply(r#"{"jsonrpc":"2.0","method":"nope"}"#, &mut echo),
            None
        );
        assert_eq!(echo.calls, ["echo", "nope"]);
    }

    #[test]
    fn malformed_requests_are_invalid_and_not_executed() {
        let mut echo = Echo::default();
        for (text, id) in [
            (r#"{"method":"echo","id":1}"#, json!(1)),
            (r#"{"jsonrpc":"1.0","method":"echo","id":2}"#, json!(2)),
            (r#"{"jsonrpc":"2.0","id":3}"#, json!(3)),
            (r#"{"jsonrpc":"2.0","method":5,"id":4}"#, json!(4)),
            (
                r#"{"jsonrpc":"2.0","method":"echo","params":"x","id":5}"#,
                json!(5),
            ),
            (
                r#"{"jsonrpc":"2.0","method":"echo","id":6,"extra":true}"#,
                json!(6),
            ),
            (
                r#"{"jsonrpc":"2.0","method":"echo","id":{"a":1}}"#,
                Value::Null,
            ),
            (
                r#"{"jsonrpc":"2.0","method":"echo"," id":[1]}"#,
                Value::Null,
            ),
            ("42", Value::Null),
            (r#""echo""#, Value::Null),
            ("[]", Value::Null),
        ] {
            let r = reply(text, &mut echo).unwrap();
            assert_eq!(r["error"]["code"], json!(-32600), "{text}");
            assert_eq!(r["id"], id, "{text}");
            assert!(r["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("Invalid request: "));
        }
        assert!(echo.calls.is_empty());
    }

    #[test]
    fn batches_reply_per_request_and_skip_notifications() {
        let mut echo = Echo::default();
        let r = reply(
            r#"[{"jsonrpc":"2.0","method":"echo","params":[1],"id":1},
                {"jsonrpc":"2.0","method":"echo","params":[2]},
                {"jsonrpc":"2.0","method":"nope","id":3},
                7]"#,
            &mut echo,
        )
        .unwrap();
        let items = r.as_array().unwrap();
        assert_eq!(items.len(), 3);
        assert_eq!(items[0], json!({"jsonrpc":"2.0","id":1,"result":[1]}));
        assert_eq!(items[1]["error"]["code"], json!(-32601));
        assert_eq!(items[2]["error"]["code"], json!(-32600));
        assert_eq!(
            reply(r#"[{"jsonrpc":"2.0","method":"echo"}]"#, &mut echo),
            None
        );
    }
}
