//! Clerk webhook events and what each does to session state.
//!
//! Only verified payloads reach this module. Envelope: `{"type", "object": "event", "data",
//! "timestamp", "instance_id"}` (clerk-protocol.md section 4.3). The payload's own `timestamp`
//! has an unconfirmed unit, so the time of a revocation is the verified delivery time instead.
//!
//! - `session.revoked` / `session.ended` / `session.removed`: the session id is denied.
//! - `session.created` / `session.pending`: the session's status is recorded.
//! - `user.deleted`: every token of the user issued before now is denied.
//! - `user.updated` with `banned` or `locked` true: the same.
//! - everything else is counted and acknowledged.
//!
//! Session and user events are also passed to the [`Guard`]'s change listener, so copies held
//! elsewhere (the local API's user and session caches) are dropped.

use serde::Deserialize;
use serde_json::Value;

use crate::revocations::{Changed, Guard, SessionStatus};
use crate::telemetry::{Label, WebhookEventType};

/// A parsed event: its type and the fields clerkgate acts on.
#[derive(Debug, Clone)]
pub(super) struct Event {
    pub kind: WebhookEventType,
    /// The type as Clerk sent it (forwarded in a header).
    pub type_name: String,
    /// `data.id`.
    pub id: Option<String>,
    /// `data.status` (sessions).
    pub status: Option<SessionStatus>,
    /// `data.banned || data.locked` (users).
    pub blocked: bool,
}

impl WebhookEventType {
    fn from_name(name: &str) -> Self {
        match name {
            "session.created" => Self::SessionCreated,
            "session.pending" => Self::SessionPending,
            "session.ended" => Self::SessionEnded,
            "session.removed" => Self::SessionRemoved,
            "session.revoked" => Self::SessionRevoked,
            "user.created" => Self::UserCreated,
            "user.updated" => Self::UserUpdated,
            "user.deleted" => Self::UserDeleted,
            _ => Self::Other,
        }
    }

    /// The label, for logs.
    pub fn as_label_str(self) -> &'static str {
        self.as_label()
    }
}

/// Why a verified payload is unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(super) enum PayloadError {
    #[error("payload is not UTF-8 JSON with a string `type`")]
    NotAnEvent,
    #[error("event lacks `data.id`")]
    MissingId,
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    type_name: String,
    #[serde(default)]
    data: Value,
}

/// The event type alone (for counting duplicates without a full parse).
pub(super) fn event_type(body: &[u8]) -> Option<WebhookEventType> {
    serde_json::from_slice::<Envelope>(body)
        .ok()
        .map(|e| WebhookEventType::from_name(&e.type_name))
}

pub(super) fn parse(body: &[u8]) -> Result<Event, PayloadError> {
    // Svix's own libraries require UTF-8; so do we.
    let text = std::str::from_utf8(body).map_err(|_| PayloadError::NotAnEvent)?;
    let envelope: Envelope = serde_json::from_str(text).map_err(|_| PayloadError::NotAnEvent)?;
    let kind = WebhookEventType::from_name(&envelope.type_name);
    let data = &envelope.data;
    let id = data.get("id").and_then(Value::as_str).map(str::to_owned);
    let needs_id = !matches!(
        kind,
        WebhookEventType::Other | WebhookEventType::UserCreated
    );
    if needs_id && id.as_deref().is_none_or(str::is_empty) {
        return Err(PayloadError::MissingId);
    }
    let flag = |name: &str| data.get(name).and_then(Value::as_bool).unwrap_or(false);
    Ok(Event {
        kind,
        type_name: envelope.type_name.clone(),
        id,
        status: data
            .get("status")
            .and_then(Value::as_str)
            .map(SessionStatus::parse),
        blocked: flag("banned") || flag("locked"),
    })
}

/// Applies an event to session state; `now_ms` is the verified delivery time.
pub(super) async fn apply(event: &Event, sessions: &Guard, now_ms: u64) {
    let Some(id) = event.id.as_deref() else {
        return;
    };
    match event.kind {
        WebhookEventType::SessionRevoked
        | WebhookEventType::SessionEnded
        | WebhookEventType::SessionRemoved => {
            let status = event.status.unwrap_or(match event.kind {
                WebhookEventType::SessionEnded => SessionStatus::Ended,
                WebhookEventType::SessionRemoved => SessionStatus::Removed,
                _ => SessionStatus::Revoked,
            });
            sessions.revoke_session(id, status).await;
            sessions.changed(Changed::Session(id));
        }
        WebhookEventType::SessionCreated | WebhookEventType::SessionPending => {
            let status =
                event
                    .status
                    .unwrap_or(if event.kind == WebhookEventType::SessionPending {
                        SessionStatus::Pending
                    } else {
                        SessionStatus::Active
                    });
            sessions.set_status(id, status).await;
            sessions.changed(Changed::Session(id));
        }
        WebhookEventType::UserDeleted => {
            sessions.cut_off_user(id, now_ms);
            sessions.changed(Changed::User(id));
        }
        WebhookEventType::UserUpdated => {
            if event.blocked {
                sessions.cut_off_user(id, now_ms);
            }
            sessions.changed(Changed::User(id));
        }
        // The local API may hold a brief 404 for this id (a read before Clerk announced it).
        WebhookEventType::UserCreated => sessions.changed(Changed::User(id)),
        WebhookEventType::Other | WebhookEventType::Unverified => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_parse_into_actions() {
        let e = parse(br#"{"type":"session.revoked","object":"event","data":{"id":"sess_1","status":"revoked","user_id":"user_1"}}"#).unwrap();
        assert_eq!(e.kind, WebhookEventType::SessionRevoked);
        assert_eq!(e.id.as_deref(), Some("sess_1"));
        let e = parse(
            br#"{"type":"user.updated","data":{"id":"user_1","banned":false,"locked":true}}"#,
        )
        .unwrap();
        assert!(e.blocked);
        let e = parse(br#"{"type":"organization.created","data":{}}"#).unwrap();
        assert_eq!(e.kind, WebhookEventType::Other);
        assert_eq!(
            parse(br#"{"type":"user.deleted","data":{}}"#).unwrap_err(),
            PayloadError::MissingId
        );
        assert_eq!(parse(b"\xff\xfe").unwrap_err(), PayloadError::NotAnEvent);
        assert_eq!(
            parse(br#"{"data":{}}"#).unwrap_err(),
            PayloadError::NotAnEvent
        );
    }
}
