//! Authentication, bad input, idempotency and the OpenAPI document, over real HTTP.

use std::collections::BTreeSet;

use reqwest::Method;
use serde_json::{Value, json};
use uuid::Uuid;

use ferry_service::{OPENAPI_JSON, ROUTES};

use crate::harness::{
    ADMIN, Backend, Backing, CONSUMER, CheckServer, PRODUCER, Server, fast_settings, prepare_body,
};

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("(no error code)")
}

/// Every route refuses a missing or unknown token (401) and a token without the scope
/// (403); public routes need none.
pub(crate) async fn auth_is_enforced_on_every_route(backend: Backend) {
    let backing = Backing::new(backend).await;
    let server = Server::start(&backing, fast_settings()).await;
    let check = CheckServer::start().await;
    let id = server.prepare("a1", &check.url).await;
    let body = prepare_body("a2", &check.url);
    let public = ["/v1/openapi.json", "/metrics", "/healthz"];
    for (method, template) in ROUTES {
        let path = template.replace("{id}", &id.to_string());
        let method: Method = method.parse().expect("method");
        let with_body = (method == Method::POST && path == "/v1/messages").then_some(&body);
        if public.contains(&path.as_str()) {
            let (status, _) = server.call(method, &path, None, None).await;
            assert_eq!(status, 200, "{path} is public");
            continue;
        }
        let (status, answer) = server.call(method.clone(), &path, None, with_body).await;
        assert_eq!(
            (status, code(&answer)),
            (401, "unauthorized"),
            "{method} {path}"
        );
        let (status, answer) = server
            .call(
                method.clone(),
                &path,
                Some("not-a-valid-token-at-all"),
                with_body,
            )
            .await;
        assert_eq!(
            (status, code(&answer)),
            (401, "unauthorized"),
            "{method} {path}"
        );
        let (status, answer) = server
            .call(
                method.clone(),
                &path,
                Some(&format!("{PRODUCER}x")),
                with_body,
            )
            .await;
        assert_eq!(
            status, 401,
            "a token's prefix is not the token: {method} {path} {answer}"
        );
    }
    let forbidden = [
        (Method::POST, "/v1/messages".to_owned(), CONSUMER),
        (Method::POST, format!("/v1/messages/{id}/confirm"), CONSUMER),
        (Method::POST, format!("/v1/messages/{id}/cancel"), CONSUMER),
        (Method::POST, format!("/v1/messages/{id}/ack"), PRODUCER),
        (Method::POST, format!("/v1/messages/{id}/retry"), PRODUCER),
        (Method::POST, format!("/v1/messages/{id}/retry"), CONSUMER),
        (Method::GET, "/v1/messages".to_owned(), PRODUCER),
        (Method::GET, "/v1/messages".to_owned(), CONSUMER),
    ];
    for (method, path, token) in forbidden {
        let with_body = (path == "/v1/messages" && method == Method::POST).then_some(&body);
        let (status, answer) = server
            .call(method.clone(), &path, Some(token), with_body)
            .await;
        assert_eq!(
            (status, code(&answer)),
            (403, "forbidden"),
            "{method} {path}"
        );
        assert!(
            answer["error"]["message"]
                .as_str()
                .expect("message")
                .contains("scope"),
            "{answer}"
        );
    }
    // A 401 names the scheme to use.
    let response = reqwest::Client::new()
        .get(format!("{}/v1/messages/{id}", server.base))
        .send()
        .await
        .expect("sent");
    assert_eq!(
        response.headers()["www-authenticate"],
        "Bearer realm=\"ferry\""
    );
    // Nothing changed on the way: the message is still prepared.
    assert_eq!(server.message(id).await["status"], "prepared");
    // Admin may do what producers and consumers do.
    let (status, _) = server
        .get(&format!("/v1/messages/{id}"), Some(CONSUMER))
        .await;
    assert_eq!(status, 200);
    let (status, _) = server
        .post(&format!("/v1/messages/{id}/cancel"), Some(ADMIN))
        .await;
    assert_eq!(status, 200);
    server.stop().await;
    backing.stop().await;
}

/// Bad input gets a 4xx JSON error naming what is wrong; illegal transitions a 409 with
/// the current status; repeated requests are idempotent.
pub(crate) async fn bad_input_and_illegal_transitions(backend: Backend) {
    let backing = Backing::new(backend).await;
    let mut settings = fast_settings();
    settings.max_payload_bytes = 1000;
    let server = Server::start(&backing, settings).await;
    let check = CheckServer::start().await;
    let url = check.url.clone();
    let post = |body: Value| {
        let server = &server;
        async move {
            server
                .call(Method::POST, "/v1/messages", Some(PRODUCER), Some(&body))
                .await
        }
    };

    let mut missing = prepare_body("b", &url);
    missing.as_object_mut().expect("object").remove("check_url");
    let (status, body) = post(missing).await;
    assert_eq!((status, code(&body)), (400, "invalid_body"));
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("check_url"),
        "{body}"
    );

    let mut unknown = prepare_body("b", &url);
    unknown["colour"] = json!("red");
    let (status, body) = post(unknown).await;
    assert_eq!((status, code(&body)), (400, "invalid_body"));
    assert!(body.to_string().contains("colour"), "{body}");

    let mut bad_id = prepare_body("b", &url);
    bad_id["id"] = json!("12345");
    let (status, body) = post(bad_id).await;
    assert_eq!((status, code(&body)), (400, "invalid_id"));

    let mut big = prepare_body("b", &url);
    big["payload"] = json!("x".repeat(1001));
    let (status, body) = post(big).await;
    assert_eq!((status, code(&body)), (413, "payload_too_large"));
    assert!(body.to_string().contains("1000"), "{body}");

    // Far past the body limit: the sender still reads a 413, not a reset connection.
    let mut huge = prepare_body("b", &url);
    huge["payload_base64"] = json!("A".repeat(4_000_000));
    huge.as_object_mut().expect("object").remove("payload");
    let (status, body) = post(huge).await;
    assert_eq!((status, code(&body)), (413, "payload_too_large"), "{body}");

    // What openapi.json says: an optional field is left out, not null; exactly one of
    // payload and payload_base64, and `"payload": null` is the JSON payload null.
    let mut null_id = prepare_body("b", &url);
    null_id["id"] = Value::Null;
    let (status, body) = post(null_id).await;
    assert_eq!((status, code(&body)), (400, "invalid_body"), "{body}");
    let mut no_payload = prepare_body("b", &url);
    no_payload
        .as_object_mut()
        .expect("object")
        .remove("payload");
    let (status, body) = post(no_payload).await;
    assert_eq!((status, code(&body)), (400, "invalid_field"), "{body}");
    let mut null_payload = prepare_body("null-payload", &url);
    null_payload["payload"] = Value::Null;
    let (status, body) = post(null_payload).await;
    assert_eq!(status, 201, "{body}");
    assert!(
        body["payload"].is_null() && body.get("payload_base64").is_none(),
        "{body}"
    );

    let mut both = prepare_body("b", &url);
    both["payload_base64"] = json!("AAAA");
    let (status, body) = post(both).await;
    assert_eq!((status, code(&body)), (400, "invalid_field"));

    let mut bad_url = prepare_body("b", &url);
    bad_url["check_url"] = json!("http://user:secret@example.com/check");
    let (status, body) = post(bad_url).await;
    assert_eq!((status, code(&body)), (400, "invalid_field"));
    assert!(!body.to_string().contains("secret"), "{body}");

    let mut reserved = prepare_body("b", &url);
    reserved["headers"] = json!({"ferry-delivery-attempt": "9"});
    let (status, body) = post(reserved).await;
    assert_eq!((status, code(&body)), (400, "invalid_field"));

    let mut empty = prepare_body("b", &url);
    empty["event_type"] = json!("");
    let (status, body) = post(empty).await;
    assert_eq!((status, code(&body)), (400, "invalid_field"));
    assert!(body.to_string().contains("event_type"), "{body}");

    let response = reqwest::Client::new()
        .post(format!("{}/v1/messages", server.base))
        .bearer_auth(PRODUCER)
        .header("content-type", "application/json")
        .body("{\"aggregate_type\": ")
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 400);
    let response = reqwest::Client::new()
        .post(format!("{}/v1/messages", server.base))
        .bearer_auth(PRODUCER)
        .header("content-type", "text/plain")
        .body(prepare_body("b", &url).to_string())
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 415);

    for (path, expected) in [
        ("/v1/messages/not-a-uuid", "invalid_id"),
        ("/v1/messages?status=shipped", "invalid_status"),
        ("/v1/messages?cursor=garbage", "invalid_cursor"),
        ("/v1/messages?cursor=", "invalid_cursor"),
        ("/v1/messages?limit=0", "invalid_limit"),
        ("/v1/messages?limit=many", "invalid_limit"),
        ("/v1/messages?order=desc", "invalid_query"),
    ] {
        let (status, body) = server.get(path, Some(ADMIN)).await;
        assert_eq!((status, code(&body)), (400, expected), "{path}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    let unknown_id = Uuid::now_v7();
    let (status, body) = server
        .post(
            &format!("/v1/messages/{unknown_id}/confirm"),
            Some(PRODUCER),
        )
        .await;
    assert_eq!((status, code(&body)), (404, "not_found"));
    let (status, body) = server.get("/v1/nothing-here", Some(ADMIN)).await;
    assert_eq!((status, code(&body)), (404, "not_found"));
    let (status, body) = server
        .call(Method::DELETE, "/v1/messages", Some(ADMIN), None)
        .await;
    assert_eq!((status, code(&body)), (405, "method_not_allowed"));

    // Idempotent prepare with a producer-chosen id; the same id with other content is a 409.
    let id = Uuid::now_v7();
    let mut with_id = prepare_body("c", &url);
    with_id["id"] = json!(id);
    let (status, _) = post(with_id.clone()).await;
    assert_eq!(status, 201);
    let (status, body) = post(with_id.clone()).await;
    assert_eq!(
        (status, body["id"].as_str()),
        (200, Some(id.to_string().as_str()))
    );
    with_id["payload"] = json!({"other": true});
    let (status, body) = post(with_id).await;
    assert_eq!((status, code(&body)), (409, "id_conflict"));

    // Illegal transitions name the current status and change nothing.
    let (status, body) = server
        .post(&format!("/v1/messages/{id}/ack"), Some(CONSUMER))
        .await;
    assert_eq!((status, code(&body)), (409, "illegal_transition"));
    assert_eq!(body["error"]["current_status"], "prepared");
    let (status, body) = server
        .post(&format!("/v1/messages/{id}/retry"), Some(ADMIN))
        .await;
    assert_eq!(
        (status, body["error"]["current_status"].as_str()),
        (409, Some("prepared"))
    );
    let (status, first) = server
        .post(&format!("/v1/messages/{id}/confirm"), Some(PRODUCER))
        .await;
    assert_eq!(status, 200);
    let (status, again) = server
        .post(&format!("/v1/messages/{id}/confirm"), Some(PRODUCER))
        .await;
    assert_eq!(status, 200, "confirm is idempotent");
    assert_eq!(again["version"], first["version"]);
    let (status, body) = server
        .post(&format!("/v1/messages/{id}/cancel"), Some(PRODUCER))
        .await;
    assert_eq!((status, code(&body)), (409, "illegal_transition"));
    assert!(
        ["confirmed", "delivered"]
            .contains(&body["error"]["current_status"].as_str().unwrap_or("")),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("cannot be cancelled")
    );
    server
        .wait_status(id, "delivered", std::time::Duration::from_secs(20))
        .await;
    assert_eq!(backing.outbox_rows(id).await, 0);
    server.stop().await;
    let sent = backing.stream_messages().await;
    assert_eq!(sent.len(), 1, "a repeated confirm enqueues nothing more");
    backing.stop().await;
}

/// `/v1/openapi.json` serves the committed document, which describes exactly the routes
/// the router has; each listed route exists on the server.
pub(crate) async fn openapi_document_matches_the_routes(backend: Backend) {
    let backing = Backing::new(backend).await;
    let server = Server::start(&backing, fast_settings()).await;
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json"))
        .expect("openapi.json in the crate");
    assert_eq!(OPENAPI_JSON, committed);
    let served = server.text("/v1/openapi.json").await;
    assert_eq!(
        served, committed,
        "the served document is the committed file"
    );
    let doc: Value = serde_json::from_str(&served).expect("valid JSON");
    assert_eq!(doc["openapi"], "3.1.0");
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .expect("path item")
                .keys()
                .filter(|k| ["get", "post", "put", "delete", "patch"].contains(&k.as_str()))
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect();
    let routed: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    assert_eq!(
        documented, routed,
        "the document and the router list the same routes"
    );
    for (method, path) in ROUTES {
        let path = path.replace("{id}", &Uuid::now_v7().to_string());
        let (status, body) = server
            .call(method.parse().expect("method"), &path, Some(ADMIN), None)
            .await;
        let missing_route = status == 405
            || (status == 404
                && body["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("no such route")));
        assert!(
            !missing_route,
            "{method} {path} is not routed: {status} {body}"
        );
    }
    let (status, health) = server.get("/healthz", None).await;
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    server.stop().await;
    backing.stop().await;
}

/// The operators' routes: a confirmed message the relay has not published yet is skipped
/// (parked), listed, and requeued; bad input is named; only admin tokens may.
pub(crate) async fn operations_skip_list_and_requeue(backend: Backend) {
    let mut backing = Backing::new(backend).await;
    backing.stop_relay().await;
    let server = Server::start(&backing, fast_settings()).await;
    let check = CheckServer::start().await;
    let id = server.prepare("ops-1", &check.url).await;
    let (status, _) = server
        .post(&format!("/v1/messages/{id}/confirm"), Some(PRODUCER))
        .await;
    assert_eq!(status, 200);

    let (status, blocked) = server.get("/v1/ops/blocked", Some(ADMIN)).await;
    assert_eq!((status, blocked), (200, json!([])));
    let (status, answer) = server.post("/v1/ops/partitions/0/retry", Some(ADMIN)).await;
    assert_eq!((status, code(&answer)), (409, "not_blocked"));
    let (status, answer) = server.post("/v1/ops/partitions/x/retry", Some(ADMIN)).await;
    assert_eq!((status, code(&answer)), (400, "invalid_partition"));

    let skip = |reason: &str| json!({ "reason": reason });
    let skip_path = format!("/v1/ops/messages/{id}/skip");
    let (status, answer) = server
        .call(Method::POST, &skip_path, Some(PRODUCER), Some(&skip("no")))
        .await;
    assert_eq!((status, code(&answer)), (403, "forbidden"));
    let (status, answer) = server
        .call(Method::POST, &skip_path, Some(ADMIN), Some(&skip("  ")))
        .await;
    assert_eq!((status, code(&answer)), (400, "invalid_reason"));
    let (status, answer) = server
        .call(
            Method::POST,
            &format!("/v1/ops/messages/{}/skip", Uuid::now_v7()),
            Some(ADMIN),
            Some(&skip("unknown")),
        )
        .await;
    assert_eq!((status, code(&answer)), (404, "not_found"));
    let (status, parked) = server
        .call(
            Method::POST,
            &skip_path,
            Some(ADMIN),
            Some(&skip("the consumer cannot read it")),
        )
        .await;
    assert_eq!(status, 200, "{parked}");
    assert_eq!(parked["message"]["id"], id.to_string());
    assert_eq!(parked["message"]["aggregate_id"], "ops-1");
    assert_eq!(parked["reason"], "the consumer cannot read it");
    assert_eq!(parked["parked_by"], "token admin");
    assert_eq!(parked["holds_aggregate"], false);
    assert_eq!(backing.outbox_rows(id).await, 0, "out of the outbox");

    for bad in [
        "aggregate_type=account",
        "limit=0",
        "limit=1001",
        "after=x",
        "colour=blue",
    ] {
        let (status, answer) = server
            .get(&format!("/v1/ops/parked?{bad}"), Some(ADMIN))
            .await;
        assert_eq!(status, 400, "{bad}: {answer}");
    }
    let (status, listed) = server
        .get(
            "/v1/ops/parked?aggregate_type=order&aggregate_id=ops-1&limit=10",
            Some(ADMIN),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0], parked);

    let requeue = json!({ "aggregate_type": "order", "aggregate_id": "ops-1" });
    let (status, answer) = server
        .call(
            Method::POST,
            "/v1/ops/parked/requeue",
            Some(ADMIN),
            Some(&requeue),
        )
        .await;
    assert_eq!(
        (status, answer["requeued"].as_u64()),
        (200, Some(1)),
        "{answer}"
    );
    assert_eq!(backing.outbox_rows(id).await, 1, "back in the outbox");
    let (status, answer) = server
        .call(
            Method::POST,
            "/v1/ops/parked/requeue",
            Some(ADMIN),
            Some(&requeue),
        )
        .await;
    assert_eq!((status, code(&answer)), (404, "not_found"));
    let (status, answer) = server
        .call(
            Method::POST,
            "/v1/ops/parked/requeue",
            Some(ADMIN),
            Some(&json!({ "aggregate_type": "order" })),
        )
        .await;
    assert_eq!((status, code(&answer)), (400, "invalid_body"));
    server.stop().await;
    backing.stop().await;
}
