//! A statement whose caller is gone (dropped in flight) does not cost the pool its
//! connection.

use crate::support::{database_url, pg_test};
use cqrs_postgres::PgOptions;
use sqlx::AssertSqlSafe;
use std::time::Duration;

pg_test! {
    /// A statement dropped in flight (its caller gone: a client that left, a timeout) that the
    /// server then fails gives its connection back to the pool once it ended, over TLS as in
    /// plain text. Over TLS, sqlx closed such a connection with a hard close that hung, and the
    /// pool never had it back.
    async fn a_statement_dropped_in_flight_that_fails_gives_its_connection_back(db: PgDatabase) {
        let url = database_url();
        let separator = if url.contains('?') { '&' } else { '?' };
        let plain = format!("{url}{separator}sslmode=disable");
        // The TLS half through a TLS proxy in front of the server (`verify-full` with the test
        // CA: over TLS or not at all), whatever DATABASE_URL's server offers.
        #[cfg(feature = "tls")]
        let (_proxy, tls) = crate::tls_connections_verify_the_server::tls_server("ca.pem")
            .await
            .expect("Postgres is available");
        #[cfg(not(feature = "tls"))]
        let tls = {
            eprintln!("a_statement_dropped_in_flight: built without `tls`: both halves in plain text");
            url
        };
        for url in [tls, plain] {
            let one = PgOptions::new(url.clone())
                .schema(db.schema())
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(10))
                .connect()
                .await
                .expect("connect");
            for _ in 0..2 {
                // Fails with a division by zero once its 1 s sleep is over: long after the
                // give-up below, even for a test thread descheduled on a busy machine.
                let failing = sqlx::query_scalar::<_, i32>(AssertSqlSafe(
                    "SELECT 1 / (0 * (SELECT count(*) FROM pg_sleep(1)))::int".to_owned(),
                ))
                .fetch_one(one.pool());
                let gave_up = tokio::time::timeout(Duration::from_millis(50), failing).await;
                assert!(gave_up.is_err(), "the statement was still running");
                let answer = sqlx::query_scalar::<_, i32>(AssertSqlSafe("SELECT 1".to_owned()))
                    .fetch_one(one.pool())
                    .await
                    .unwrap_or_else(|e| panic!("{url}: the pool's one connection: {e}"));
                assert_eq!(answer, 1);
            }
            one.pool().close().await;
        }
    }
}
