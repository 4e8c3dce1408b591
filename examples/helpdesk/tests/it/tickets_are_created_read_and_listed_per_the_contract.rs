use crate::support::*;
use reqwest::StatusCode;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_ticket_has_the_defaults_and_reads_back_with_comments() {
    within(async {
        let s = TestServer::start().await;
        let (token, user_id) = s.customer().await;
        let r = s
            .post(
                "/tickets",
                &token,
                json!({ "title": "  Printer <on> \"fire\"  ", "description": "  as sent  " }),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
        let t = &r.body;
        assert_eq!(t["title"], "Printer <on> \"fire\"", "trimmed, not escaped");
        assert_eq!(t["description"], "  as sent  ");
        assert_eq!(t["priority"], "normal");
        assert_eq!(t["status"], "open");
        assert_eq!(t["version"], 1);
        assert_eq!(t["reporter_id"], user_id);
        assert!(t["assignee_id"].is_null());
        assert_eq!(t["comments"], json!([]));
        for field in ["created_at", "updated_at"] {
            let at = t[field].as_str().unwrap();
            assert!(
                chrono::DateTime::parse_from_rfc3339(at).is_ok() && at.ends_with('Z'),
                "{field}: {at}"
            );
        }
        let id = t["id"].as_str().unwrap();
        let location = r.headers.get("location").expect("a Location").to_str();
        assert_eq!(location.unwrap(), format!("/tickets/{id}"));
        let read = s.get(&format!("/tickets/{id}"), &token).await;
        assert_eq!(read.status, StatusCode::OK);
        assert_eq!(&read.body, t);

        let urgent = s
            .post(
                "/tickets",
                &token,
                json!({ "title": "x", "priority": "urgent" }),
            )
            .await;
        assert_eq!(urgent.body["priority"], "urgent");
        s.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_tickets_are_refused() {
    within(async {
        let s = TestServer::start().await;
        let (token, _) = s.customer().await;
        for body in [
            json!({ "title": "" }),
            json!({ "title": "   " }),
            json!({ "title": "t".repeat(201) }),
            json!({ "title": "ok", "description": "d".repeat(10_001) }),
        ] {
            s.post("/tickets", &token, body)
                .await
                .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
        }
        for body in [
            json!({ "title": "ok", "priority": "whenever" }),
            json!({ "title": 7 }),
            json!({}),
            json!([1, 2]),
        ] {
            s.post("/tickets", &token, body)
                .await
                .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");
        }
        let r = s
            .post(
                "/tickets",
                &token,
                json!({ "title": "t".repeat(200), "description": "d".repeat(10_000) }),
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::CREATED,
            "the limits themselves are accepted"
        );
        // The limits in characters outside the BMP, each escaped as a client's JSON encoder
        // may (`\ud83d\ude00`, 12 bytes): a valid ticket of about 123 KB, which the 64 KiB
        // body limit refused with 413.
        let r = post_limits_escaped(&s, &token, "\\ud83d\\ude00").await;
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "the limits in escaped astral characters are accepted"
        );
        // The limits in characters sent decomposed into four code points (`ᾂ`: `α` and
        // three combining marks), each escaped (`\u0313`, 6 bytes): counted composed, a valid
        // ticket of about 245 KB, which the 128 KiB body limit refused with 413.
        let r = post_limits_escaped(&s, &token, "\\u03b1\\u0313\\u0300\\u0345").await;
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "the limits in escaped decomposed characters are accepted"
        );
        let ticket: serde_json::Value = r.json().await.unwrap();
        assert_eq!(ticket["title"], "\u{1f82}".repeat(200), "stored composed");
        // The longest: a character composed of three code points outside the BMP (Kirat
        // Rai's U+16D6A, U+16D63 and U+16D67 twice), each escaped as two (12 bytes): 36 bytes
        // a character, a valid ticket of about 367 KB, which 256 KiB refused with 413.
        let r = post_limits_escaped(&s, &token, "\\ud81b\\udd63\\ud81b\\udd67\\ud81b\\udd67").await;
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "the limits in escaped decomposed astral characters are accepted"
        );
        let ticket: serde_json::Value = r.json().await.unwrap();
        assert_eq!(ticket["title"], "\u{16d6a}".repeat(200), "stored composed");
        s.stop().await;
    })
    .await;
}

/// POSTs a ticket whose title and description are as long as they may be (200 and 10,000
/// characters), each character written as `character` (JSON text, escapes and all).
async fn post_limits_escaped(s: &TestServer, token: &str, character: &str) -> reqwest::Response {
    let body = format!(
        r#"{{"title":"{}","description":"{}"}}"#,
        character.repeat(200),
        character.repeat(10_000)
    );
    reqwest::Client::new()
        .post(s.url("/tickets"))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customers_see_only_their_own_tickets_and_agents_see_all() {
    within(async {
        let s = TestServer::start().await;
        let (alice, _) = s.customer().await;
        let (bob, _) = s.customer().await;
        let (agent, _) = s.agent().await;
        let ticket = s.ticket(&alice, "alice's").await;
        let id = ticket["id"].as_str().unwrap();
        s.get(&format!("/tickets/{id}"), &bob)
            .await
            .assert_error(StatusCode::NOT_FOUND, "not_found");
        s.get(&format!("/tickets/{id}/history"), &bob)
            .await
            .assert_error(StatusCode::NOT_FOUND, "not_found");
        s.post(
            &format!("/tickets/{id}/comments"),
            &bob,
            json!({ "body": "hi" }),
        )
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
        s.post(&format!("/tickets/{id}/close"), &bob, json!({}))
            .await
            .assert_error(StatusCode::NOT_FOUND, "not_found");
        assert_eq!(
            s.get(&format!("/tickets/{id}"), &agent).await.status,
            StatusCode::OK
        );
        let missing = uuid::Uuid::now_v7();
        s.get(&format!("/tickets/{missing}"), &agent)
            .await
            .assert_error(StatusCode::NOT_FOUND, "not_found");
        let malformed = s.get("/tickets/not-a-uuid", &agent).await;
        assert!(
            matches!(
                malformed.status,
                StatusCode::BAD_REQUEST | StatusCode::NOT_FOUND
            ),
            "{malformed:?}"
        );
        assert!(malformed.body["error"]["code"].is_string());

        let bobs = s.get("/tickets", &bob).await;
        assert_eq!(bobs.body["items"], json!([]));
        let all = s.get("/tickets", &agent).await;
        assert!(
            all.body["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["id"] == id)
        );
        s.stop().await;
    })
    .await;
}

/// Opens an urgent ticket as `token` and has `agent` assign it to themself; its id.
async fn urgent_and_assigned(
    s: &TestServer,
    token: &str,
    title: &str,
    (agent, agent_id): (&str, &str),
) -> String {
    let r = s
        .post(
            "/tickets",
            token,
            json!({ "title": title, "priority": "urgent" }),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let id = r.body["id"].as_str().unwrap().to_owned();
    let assigned = s
        .post(
            &format!("/tickets/{id}/assign"),
            agent,
            json!({ "assignee_id": agent_id }),
        )
        .await;
    assert_eq!(assigned.status, StatusCode::OK, "{assigned:?}");
    id
}

/// A customer's list is theirs whatever it is filtered by and however it is paged: with
/// another customer's tickets assigned to the agent the filter names, of the status and the
/// priority it names, and newer than the cursor's place, none of them shows (in memory a page
/// may walk the assignee's or the priority's list, where both customers' tickets are).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customers_filtered_and_paged_lists_never_meet_anothers_tickets() {
    within(async {
        let s = TestServer::start().await;
        let (alice, _) = s.customer().await;
        let (bob, _) = s.customer().await;
        let (agent, agent_id) = s.agent().await;
        let mut bobs = Vec::new();
        for i in 0..3 {
            bobs.push(
                urgent_and_assigned(&s, &bob, &format!("bob's {i}"), (&agent, &agent_id)).await,
            );
        }
        // Alice's, many and newest: on every list Bob's filters name, and above his cursors.
        for i in 0..8 {
            urgent_and_assigned(&s, &alice, &format!("alice's {i}"), (&agent, &agent_id)).await;
        }
        bobs.reverse();
        for filter in [
            String::new(),
            "status=assigned".to_owned(),
            "priority=urgent".to_owned(),
            format!("assignee_id={agent_id}"),
            format!("status=assigned&priority=urgent&assignee_id={agent_id}"),
        ] {
            let mut seen = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let path = match &cursor {
                    Some(c) => format!("/tickets?{filter}&limit=1&cursor={c}"),
                    None => format!("/tickets?{filter}&limit=1"),
                };
                let page = s.get(&path, &bob).await;
                assert_eq!(page.status, StatusCode::OK, "{path}: {page:?}");
                seen.extend(ids(&page.body));
                match page.body["next_cursor"].as_str() {
                    Some(next) => cursor = Some(next.to_owned()),
                    None => break,
                }
                assert!(seen.len() <= bobs.len(), "{path}: {seen:?}");
            }
            assert_eq!(seen, bobs, "Bob's list `{filter}`");
        }
        s.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_are_newest_first_filtered_and_paged_with_opaque_cursors() {
    within(async {
        let s = TestServer::start().await;
        let (token, _) = s.customer().await;
        let (agent, agent_id) = s.agent().await;
        let mut created = Vec::new();
        for i in 0..7 {
            let priority = if i % 2 == 0 { "high" } else { "low" };
            let r = s
                .post(
                    "/tickets",
                    &token,
                    json!({ "title": format!("t{i}"), "priority": priority }),
                )
                .await;
            created.push(r.body["id"].as_str().unwrap().to_owned());
        }
        s.post(
            &format!("/tickets/{}/assign", created[0]),
            &agent,
            json!({ "assignee_id": agent_id }),
        )
        .await;
        created.reverse();

        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(c) => format!("/tickets?limit=3&cursor={c}"),
                None => "/tickets?limit=3".to_owned(),
            };
            let page = s.get(&path, &token).await;
            assert_eq!(page.status, StatusCode::OK, "{page:?}");
            assert!(page.body["items"].as_array().unwrap().len() <= 3);
            assert!(
                page.body["items"][0].get("comments").is_none(),
                "list items have no comments"
            );
            seen.extend(ids(&page.body));
            match page.body["next_cursor"].as_str() {
                Some(c) => {
                    assert!(
                        c.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                        "URL-safe: {c}"
                    );
                    cursor = Some(c.to_owned());
                }
                None => break,
            }
        }
        assert_eq!(seen, created, "every ticket once, newest first");

        let high = s.get("/tickets?priority=high", &token).await;
        assert_eq!(ids(&high.body).len(), 4);
        let assigned = s
            .get(
                &format!("/tickets?status=assigned&assignee_id={agent_id}"),
                &agent,
            )
            .await;
        assert_eq!(ids(&assigned.body), [created[6].clone()]);
        let open = s.get("/tickets?status=open", &token).await;
        assert_eq!(ids(&open.body).len(), 6);
        // An empty value is no value: not a second `status`.
        let with_empty = s
            .get("/tickets?status=&status=open&priority=", &token)
            .await;
        assert_eq!(with_empty.status, StatusCode::OK, "{with_empty:?}");
        assert_eq!(ids(&with_empty.body), ids(&open.body));

        for bad in [
            "limit=0",
            "limit=101",
            "limit=ten",
            "limit=-1",
            "limit=%2B5",
            "limit=1.5",
            "status=pending",
            "priority=meh",
            "assignee_id=42",
            "cursor=abc",
            "cursor=00000000000000000000000000000000000000000000000000000000000000000000000000",
            // A cursor of the length this server issues, with a tag it did not compute.
            "cursor=0000000000000000000000000000000000000000",
            // A misspelled or unsupported filter is refused, not ignored.
            "stauts=closed",
            "reporter_id=00000000-0000-0000-0000-000000000000",
            // Which one was meant?
            "status=open&status=closed",
            "limit=5&limit=5",
        ] {
            s.get(&format!("/tickets?{bad}"), &token)
                .await
                .assert_error(StatusCode::BAD_REQUEST, "invalid_query");
        }
        let repeated = s.get("/tickets?status=open&status=closed", &token).await;
        assert_eq!(repeated.body["error"]["details"]["parameter"], "status");
        // A value without a name says so (it read ": is not a parameter ..."); a lone `=`,
        // like `&&`, is nothing.
        let nameless = s.get("/tickets?=open", &token).await;
        nameless.assert_error(StatusCode::BAD_REQUEST, "invalid_query");
        assert!(
            nameless.body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("a parameter has no name (`=value`)")),
            "{nameless:?}"
        );
        assert_eq!(s.get("/tickets?&&&=&", &token).await.status, StatusCode::OK);
        // A long unknown name is not echoed in full.
        let long = "x".repeat(10_000);
        let refused = s.get(&format!("/tickets?{long}=1"), &token).await;
        refused.assert_error(StatusCode::BAD_REQUEST, "invalid_query");
        assert_eq!(
            refused.body["error"]["details"]["parameter"]
                .as_str()
                .map(str::len),
            Some(64)
        );
        assert!(refused.body["error"]["message"].as_str().unwrap().len() < 200);
        // A cursor from another server (another secret) is refused too.
        let other = TestServer::start_with(|c| {
            c.jwt_secret = Some("another-secret-that-is-32-bytes-long!!".into())
        })
        .await;
        let (other_token, _) = other.customer().await;
        for i in 0..3 {
            other.ticket(&other_token, &format!("o{i}")).await;
        }
        let foreign = other.get("/tickets?limit=1", &other_token).await.body["next_cursor"]
            .as_str()
            .unwrap()
            .to_owned();
        s.get(&format!("/tickets?cursor={foreign}"), &token)
            .await
            .assert_error(StatusCode::BAD_REQUEST, "invalid_query");
        other.stop().await;
        s.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_lists_every_event_oldest_first() {
    within(async {
        let s = TestServer::start().await;
        let (token, user_id) = s.customer().await;
        let (agent, agent_id) = s.agent().await;
        let id = s.ticket(&token, "history").await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        s.post(
            &format!("/tickets/{id}/assign"),
            &agent,
            json!({ "assignee_id": agent_id }),
        )
        .await;
        s.post(
            &format!("/tickets/{id}/comments"),
            &token,
            json!({ "body": "any news?" }),
        )
        .await;
        s.post(
            &format!("/tickets/{id}/close"),
            &agent,
            json!({ "resolution": "fixed" }),
        )
        .await;
        let h = s.get(&format!("/tickets/{id}/history"), &token).await;
        assert_eq!(h.status, StatusCode::OK);
        let items = h.body["items"].as_array().unwrap();
        let types: Vec<&str> = items.iter().map(|i| i["type"].as_str().unwrap()).collect();
        assert_eq!(
            types,
            [
                "TicketOpened",
                "TicketAssigned",
                "TicketCommented",
                "TicketClosed"
            ]
        );
        let versions: Vec<u64> = items
            .iter()
            .map(|i| i["version"].as_u64().unwrap())
            .collect();
        assert_eq!(versions, [1, 2, 3, 4]);
        let actors: Vec<&str> = items
            .iter()
            .map(|i| i["actor_id"].as_str().unwrap())
            .collect();
        assert_eq!(
            actors,
            [
                user_id.as_str(),
                agent_id.as_str(),
                user_id.as_str(),
                agent_id.as_str()
            ]
        );
        assert_eq!(items[2]["data"]["body"], "any news?");
        assert_eq!(items[3]["data"]["resolution"], "fixed");
        for item in items {
            assert!(uuid::Uuid::parse_str(item["event_id"].as_str().unwrap()).is_ok());
            assert!(
                chrono::DateTime::parse_from_rfc3339(item["occurred_at"].as_str().unwrap()).is_ok()
            );
        }
        s.stop().await;
    })
    .await;
}

/// The list is ordered by when tickets entered it, not by their creation time: a ticket
/// stamped before the tickets of a page a client already read, but committed after it (its
/// command was slower), is on top of the list, not below that page's cursor, where a client
/// walking on from the cursor would never see it. The clock going back stands in for the
/// slower command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_committed_after_a_page_was_read_is_not_hidden_below_its_cursor() {
    use std::time::Duration;
    within(async {
        let s = TestServer::start().await;
        let (token, _) = s.customer().await;
        let id = |ticket: &Value| ticket["id"].as_str().unwrap().to_owned();
        let start = cqrs_core::clock::Clock::now(&s.clock);
        let first = s.ticket(&token, "first").await;
        s.clock.advance(Duration::from_secs(10));
        let second = s.ticket(&token, "second").await;
        s.clock.advance(Duration::from_secs(20));
        let third = s.ticket(&token, "third").await;
        let page = s.get("/tickets?limit=2", &token).await;
        assert_eq!(ids(&page.body), [id(&third), id(&second)]);
        let cursor = page.body["next_cursor"].as_str().unwrap().to_owned();
        // Stamped between the page's two, committed after the page was read.
        s.clock.set(start + chrono::Duration::seconds(20));
        let late = s.ticket(&token, "stamped earlier, committed later").await;
        let rest = s.get(&format!("/tickets?cursor={cursor}"), &token).await;
        assert_eq!(rest.status, StatusCode::OK, "{rest:?}");
        assert_eq!(ids(&rest.body), [id(&first)], "the rest of the walk");
        let again = s.get("/tickets", &token).await;
        assert_eq!(
            ids(&again.body),
            [id(&late), id(&third), id(&second), id(&first)],
            "the ticket that entered the list last is on top, where a new walk finds it"
        );
        s.stop().await;
    })
    .await;
}

/// Ticket times come from the server's clock (a manual one here), like its tokens' and
/// idempotency keys': a ticket opened and commented on after the clock moved carries the
/// clock's times, in the ticket, its comments and its history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticket_times_follow_the_servers_clock() {
    use cqrs_core::clock::Clock;
    let at = |value: &serde_json::Value| {
        chrono::DateTime::parse_from_rfc3339(value.as_str().unwrap())
            .unwrap()
            .with_timezone(&chrono::Utc)
    };
    within(async {
        let s = TestServer::start().await;
        s.clock.advance(std::time::Duration::from_secs(48 * 3600));
        let (token, _) = s.customer().await;
        let opened_at = s.clock.now();
        let ticket = s.ticket(&token, "later").await;
        let id = ticket["id"].as_str().unwrap().to_owned();
        assert_eq!(at(&ticket["created_at"]), opened_at);
        s.clock.advance(std::time::Duration::from_secs(60));
        let commented_at = s.clock.now();
        let commented = s
            .post(
                &format!("/tickets/{id}/comments"),
                &token,
                serde_json::json!({ "body": "still broken" }),
            )
            .await;
        assert_eq!(at(&commented.body["comment"]["created_at"]), commented_at);
        let ticket = s.get(&format!("/tickets/{id}"), &token).await;
        assert_eq!(at(&ticket.body["created_at"]), opened_at);
        assert_eq!(at(&ticket.body["updated_at"]), commented_at);
        let history = s.get(&format!("/tickets/{id}/history"), &token).await;
        let times: Vec<_> = history.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| at(&e["occurred_at"]))
            .collect();
        assert_eq!(times, [opened_at, commented_at]);
        s.stop().await;
    })
    .await;
}

/// A command's events carry its request's id as correlation id (the `X-Request-Id` the client
/// sent, or the one the gateway made up and returned): a support engineer can go from a
/// request to what it did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commands_events_carry_its_request_id() {
    within(async {
        let s = TestServer::start().await;
        let (token, _) = s.customer().await;
        let request_id = uuid::Uuid::now_v7().to_string();
        let opened = Response::from(
            s.http
                .post(s.url("/tickets"))
                .bearer_auth(&token)
                .header("x-request-id", &request_id)
                .json(&json!({ "title": "traced" }))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(opened.status, StatusCode::CREATED, "{opened:?}");
        assert_eq!(opened.headers["x-request-id"], request_id.as_str());
        let id = opened.body["id"].as_str().unwrap().to_owned();
        // Without a header of its own, the request gets the gateway's id.
        let commented = s
            .post(
                &format!("/tickets/{id}/comments"),
                &token,
                json!({ "body": "hello" }),
            )
            .await;
        assert_eq!(commented.status, StatusCode::CREATED, "{commented:?}");
        let generated = commented.headers["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        let h = s.get(&format!("/tickets/{id}/history"), &token).await;
        let correlation: Vec<&str> = h.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["correlation_id"].as_str().unwrap())
            .collect();
        assert_eq!(correlation, [request_id.as_str(), generated.as_str()]);
        s.stop().await;
    })
    .await;
}

/// On Postgres a page filtered by priority, alone or with a status, walks an index of it
/// (`tickets.list_by_priority`), not the whole list or a status's checking each ticket's
/// priority: a page of a rare priority read every ticket there. Postgres only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_by_priority_walks_an_index_of_it_on_postgres() {
    use cqrs_postgres::sqlx::{self, AssertSqlSafe, Connection, PgConnection};
    within(async {
        let Some(backend) = Backend::postgres().await else {
            return;
        };
        let (database_url, schema) = backend.database().unwrap();
        let s = TestServer::start_on(backend, |_| {}).await;
        let (token, _) = s.customer().await;
        s.ticket(&token, "one").await;
        let mut conn = PgConnection::connect(&database_url).await.unwrap();
        // The plan of the query the list runs, with a scan of the whole table ruled out: an
        // index is walked either way, and the question is which.
        sqlx::raw_sql("SET enable_seqscan = off; SET enable_bitmapscan = off")
            .execute(&mut conn)
            .await
            .unwrap();
        for (filter, index) in [
            ("priority = 'urgent'", "ticket_index_priority_listed"),
            (
                "status = 'closed' AND priority = 'urgent'",
                "ticket_index_status_priority_listed",
            ),
        ] {
            let plan: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
                "EXPLAIN SELECT listed, summary FROM {schema}.ticket_index \
                 WHERE listed IS NOT NULL AND {filter} ORDER BY listed DESC LIMIT 51"
            )))
            .fetch_all(&mut conn)
            .await
            .unwrap();
            let plan = plan.join("\n");
            assert!(plan.contains(index), "{filter}: {plan}");
        }
        s.stop().await;
    })
    .await;
}
