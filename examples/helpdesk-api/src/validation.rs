//! Field checks every plugin's handlers share, with one error shape: 422
//! `validation_failed`, `details: {field, problem}`.

use cqrs_core::HandlerError;
use serde_json::json;

/// The error for a field that fails a check.
///
/// ```
/// let e = helpdesk_api::invalid_field("title", "the title is empty");
/// assert_eq!(e.code(), "validation_failed");
/// ```
pub fn invalid_field(field: &str, problem: &str) -> HandlerError {
    HandlerError::invalid("validation_failed", format!("{field}: {problem}"))
        .with_details(json!({ "field": field, "problem": problem }))
}

/// Refuses text holding U+0000. JSON may carry it (`"\u0000"`), but Postgres `text` and
/// `jsonb` cannot store it, so without this check it would fail at the store as a 500.
///
/// ```
/// assert!(helpdesk_api::reject_nul("title", "fine").is_ok());
/// assert!(helpdesk_api::reject_nul("title", "a\0b").is_err());
/// ```
pub fn reject_nul(field: &str, value: &str) -> Result<(), HandlerError> {
    if value.contains('\0') {
        Err(invalid_field(
            field,
            "must not contain the NUL character (U+0000)",
        ))
    } else {
        Ok(())
    }
}
