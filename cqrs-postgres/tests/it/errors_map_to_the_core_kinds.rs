//! Errors arrive as the core's kinds: an unreachable server is unavailable (retryable) with
//! its cause, bad options list every problem, and nothing panics.

use cqrs_core::ports::{EventStore, ExpectedVersion, IdempotencyStore, ProjectionStore};
use cqrs_core::runtime::{Health, HealthCheck};
use cqrs_core::{ErrorKind, Position};
use cqrs_postgres::{PgError, PgOptions};
use std::time::Duration;

#[tokio::test]
async fn an_unreachable_server_is_unavailable_with_its_cause() {
    cqrs_core::testing::with_timeout(Duration::from_secs(30), async {
        // Nothing listens on port 1.
        let db = PgOptions::new("postgres://postgres@127.0.0.1:1/none")
            .acquire_timeout(Duration::from_millis(300))
            .connect_lazy()
            .expect("valid options");
        let store = db.event_store();
        let append = store
            .append("s", ExpectedVersion::Any, vec![crate::support::record(1)])
            .await
            .unwrap_err();
        assert_eq!(append.kind(), ErrorKind::Unavailable, "{append}");
        assert!(append.kind().is_retryable());
        assert!(
            std::error::Error::source(&append).is_some(),
            "the cause is kept"
        );
        assert_eq!(
            store
                .read_all(Position::START, 10)
                .await
                .unwrap_err()
                .kind(),
            ErrorKind::Unavailable
        );
        let claim = db
            .idempotency_store()
            .claim("s", "k", "fp", Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(claim.kind(), ErrorKind::Unavailable);
        let begin = db.projection_store().begin("c").await.unwrap_err();
        assert_eq!(begin.kind(), ErrorKind::Unavailable);
        assert!(matches!(db.check().await, Health::Unhealthy(_)));

        let connect = PgOptions::new("postgres://postgres@127.0.0.1:1/none")
            .acquire_timeout(Duration::from_millis(300))
            .connect()
            .await
            .unwrap_err();
        assert_eq!(connect.kind(), ErrorKind::Unavailable, "{connect}");
    })
    .await;
}

#[test]
fn invalid_options_list_every_problem() {
    let err = PgOptions::new("http://example.invalid")
        .schema("Not Valid")
        .max_connections(2)
        .min_connections(3)
        .validate()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);
    let PgError::InvalidOptions(problems) = err else {
        panic!("expected invalid options");
    };
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert!(!format!("{:?}", PgOptions::new("postgres://u:secret@h/db")).contains("secret"));
}

crate::support::pg_test! {
    /// A value Postgres cannot hold (U+0000 in a jsonb payload, or in a text stream id) is
    /// the caller's fault: `Invalid`, not an internal error, and nothing is stored.
    async fn a_value_postgres_cannot_store_is_rejected_as_invalid(db: PgDatabase) {
        let store = db.event_store();
        let mut record = crate::support::record(1);
        record.payload = serde_json::json!({ "title": "a\u{0}b" });
        let err = store
            .append("s", ExpectedVersion::Any, vec![record])
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
        let err = store
            .append("s\u{0}", ExpectedVersion::Any, vec![crate::support::record(2)])
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
        assert!(store.read_all(Position::START, 10).await.unwrap().is_empty());
    }
}
