//! `cargo run --release -p helpdesk`: the helpdesk server on 127.0.0.1:8080, in memory, or on
//! Postgres (and Redis) when `DATABASE_URL` (and `REDIS_URL`) are set.

#[tokio::main]
async fn main() {
    helpdesk::main_with(helpdesk::Hooks::default()).await
}
