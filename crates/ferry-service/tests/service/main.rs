//! The reliable message service against real PostgreSQL and SQLite stores, a real relay
//! and a real NATS JetStream stream, over real HTTP. Every test has tables (or a database
//! file) and a stream of its own, so tests run in parallel.
//!
//! Services: `FERRY_TEST_PG_URL` and `FERRY_TEST_NATS_URL` (see
//! `ferry_core::testing::services` for the defaults).
#![allow(clippy::unwrap_used)]

mod api;
mod harness;
mod protocol;
mod races;

use harness::Backend;

/// One test per backend for each scenario.
macro_rules! on_both_stores {
    ($($module:ident::$scenario:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $scenario() {
                    crate::$module::$scenario(crate::Backend::Postgres).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $scenario() {
                    crate::$module::$scenario(crate::Backend::Sqlite).await;
                }
            )*
        }
    };
}

on_both_stores!(
    protocol::prepare_confirm_deliver_ack,
    protocol::prepare_cancel_is_never_sent,
    protocol::check_back_settles_abandoned_messages,
    protocol::unacked_messages_are_redelivered_then_dead_lettered,
    protocol::listing_pages_through_every_message,
    races::confirm_races_check_back_answer,
    races::ack_races_redelivery,
    races::two_instances_check_each_message_once,
    api::auth_is_enforced_on_every_route,
    api::bad_input_and_illegal_transitions,
    api::openapi_document_matches_the_routes,
    api::operations_skip_list_and_requeue,
);
