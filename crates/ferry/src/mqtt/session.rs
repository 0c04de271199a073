//! The connection task: polls rumqttc's event loop without pause (it does all network I/O
//! there), matches each PUBACK / PUBREC / PUBCOMP to the publish it answers, and fails
//! everything in flight when the connection drops.
//!
//! rumqttc assigns packet ids inside the event loop, in the order requests reach it, and
//! reports each with an `Outgoing::Publish(pkid)` event. Publishers therefore register an
//! outcome slot and queue their request under one lock, so that slots and requests are in
//! the same order; the task pairs each `Outgoing::Publish` with the oldest unpaired slot.
//!
//! On connection loss nothing is retransmitted by rumqttc: the session starts clean and
//! its pending queue is emptied, and every publish not yet acknowledged fails as retryable,
//! so the relay re-publishes it in order. A publish that reached the broker before the
//! connection dropped is then delivered twice; MQTT has no broker-side dedup, and the
//! consumer inbox drops the repeat (docs/DESIGN.md §6).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, Packet, PubAckReason, PubCompReason, PubRecReason, PublishProperties,
};
use rumqttc::v5::{AsyncClient, ClientError, ConnectionError, Event, EventLoop, Request};
use tokio::sync::oneshot;
use tracing::{info, warn};

use ferry_core::ErrorChain;
use ferry_core::backoff::Backoff;
use ferry_core::{Delivery, SinkError};

/// Where the outcome of one publish is sent.
type Slot = oneshot::Sender<Result<Delivery, SinkError>>;

/// What the connection task and the publishers share.
#[derive(Debug)]
pub(super) struct Session {
    slots: Mutex<Slots>,
    /// Held while registering a slot and queueing its request, so both are in one order.
    submit: tokio::sync::Mutex<()>,
    connected: AtomicBool,
    stopping: AtomicBool,
    /// The broker's Maximum Packet Size from its CONNACK; 0 when it sent none.
    max_packet_size: AtomicU32,
    /// `host:port`, for messages.
    pub(super) broker: String,
}

/// Publishes awaiting an outcome, by how far they got.
#[derive(Debug, Default)]
struct Slots {
    /// Queued to the event loop, packet id not known yet; oldest first.
    unsent: VecDeque<Slot>,
    /// Sent with this packet id, awaiting PUBACK (QoS 1) or PUBCOMP (QoS 2).
    awaiting: HashMap<u16, Slot>,
    /// Taken by the event loop but held back because its packet id is still in use
    /// (the broker acked out of order); sent when that id is acked.
    collided: Option<(u16, Slot)>,
}

impl Session {
    pub(super) fn new(broker: String) -> Self {
        Self {
            slots: Mutex::default(),
            submit: tokio::sync::Mutex::new(()),
            connected: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            max_packet_size: AtomicU32::new(0),
            broker,
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        // A panic while holding the lock leaves the maps consistent (each step is one
        // insert or remove), so a poisoned lock is still usable.
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn max_packet_size(&self) -> Option<u32> {
        match self.max_packet_size.load(Ordering::Relaxed) {
            0 => None,
            size => Some(size),
        }
    }

    /// Whether the connection is up (a CONNACK since the last drop); an error naming the
    /// broker otherwise.
    pub(super) fn ensure_connected(&self) -> Result<(), SinkError> {
        if self.connected.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(SinkError::retryable(format!(
                "not connected to the mqtt broker at {} (reconnecting)",
                self.broker
            )))
        }
    }

    /// Queues one publish; the receiver yields its outcome. Fails at once, without
    /// queueing, while the connection is down: a request queued now would be sent after
    /// the reconnect, long after the relay gave up on it.
    pub(super) async fn submit(
        &self,
        client: &AsyncClient,
        topic: String,
        qos: QoS,
        payload: Bytes,
        properties: PublishProperties,
    ) -> Result<oneshot::Receiver<Result<Delivery, SinkError>>, SinkError> {
        self.ensure_connected()?;
        let _order = self.submit.lock().await;
        let (slot, outcome) = oneshot::channel();
        self.slots().unsent.push_back(slot);
        if let Err(err) = client
            .publish_bytes_with_properties(topic, qos, false, payload, properties)
            .await
        {
            // Not queued, so no event will come for it: it is the newest slot (the order
            // lock is held), take it back.
            self.slots().unsent.pop_back();
            return Err(match err {
                ClientError::TryRequest(_) => {
                    SinkError::permanent("the mqtt client refused the topic as invalid")
                }
                ClientError::Request(_) => SinkError::retryable("the mqtt sink is shut down"),
            }
            .with_source(err));
        }
        Ok(outcome)
    }

    /// Records a CONNACK: connected, and the broker's packet size limit.
    pub(super) fn connected(&self, ack: &ConnAck) {
        let max = ack
            .properties
            .as_ref()
            .and_then(|p| p.max_packet_size)
            .unwrap_or(0);
        self.max_packet_size.store(max, Ordering::Relaxed);
        self.connected.store(true, Ordering::Release);
    }

    /// Applies one event of the loop to the slots.
    fn handle(&self, event: Event) {
        match event {
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                let mut slots = self.slots();
                let slot = match slots.collided.take() {
                    Some((id, slot)) if id == pkid => Some(slot),
                    other => {
                        slots.collided = other;
                        slots.unsent.pop_front()
                    }
                };
                if let Some(slot) = slot {
                    slots.awaiting.insert(pkid, slot);
                }
            }
            Event::Outgoing(Outgoing::AwaitAck(pkid)) => {
                let mut slots = self.slots();
                if let Some(slot) = slots.unsent.pop_front() {
                    slots.collided = Some((pkid, slot));
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                self.resolve(ack.pkid, puback_outcome(ack.reason));
            }
            Event::Incoming(Packet::PubRec(rec)) => {
                // Success continues with PUBREL / PUBCOMP; a failure ends the exchange.
                if let Some(err) = pubrec_error(rec.reason) {
                    self.resolve(rec.pkid, Err(err));
                }
            }
            Event::Incoming(Packet::PubComp(comp)) => {
                let outcome = match comp.reason {
                    PubCompReason::Success => Ok(Delivery::default()),
                    PubCompReason::PacketIdentifierNotFound => Err(SinkError::retryable(
                        "the broker lost the QoS 2 exchange (PUBCOMP: packet identifier not found)",
                    )),
                };
                self.resolve(comp.pkid, outcome);
            }
            Event::Incoming(Packet::ConnAck(ack)) => {
                self.connected(&ack);
                info!(broker = %self.broker, "mqtt connection established");
            }
            Event::Incoming(Packet::Disconnect(disconnect)) => {
                warn!(broker = %self.broker, reason = ?disconnect.reason_code, "the mqtt broker closed the connection");
            }
            _ => {}
        }
    }

    fn resolve(&self, pkid: u16, outcome: Result<Delivery, SinkError>) {
        if let Some(slot) = self.slots().awaiting.remove(&pkid) {
            // The publisher may have given up (ack timeout); then nobody listens.
            let _ = slot.send(outcome);
        }
    }

    /// After the connection dropped: applies the events rumqttc still buffers (acks read
    /// before the drop, requests it took), then makes it forget every request, and fails
    /// each publish not acknowledged.
    fn connection_lost(&self, eventloop: &mut EventLoop, cause: &ConnectionError) {
        self.connected.store(false, Ordering::Release);
        let buffered: Vec<Event> = eventloop.state.events.drain(..).collect();
        for event in buffered {
            self.handle(event);
        }
        // Moves requests still in the channel into `pending` (poll does this on I/O errors,
        // not when a connection attempt fails), so that none is sent after the reconnect.
        eventloop.clean();
        let never_sent = eventloop
            .pending
            .iter()
            .filter(|request| matches!(request, Request::Publish(p) if p.pkid == 0))
            .count();
        eventloop.pending.clear();
        eventloop.state.collision = None;
        let error = || {
            SinkError::retryable(format!(
                "connection to the mqtt broker at {} lost before the ack: {cause}",
                self.broker
            ))
        };
        let mut slots = self.slots();
        let slots = &mut *slots;
        let unsent = never_sent.min(slots.unsent.len());
        let failed = slots
            .awaiting
            .drain()
            .map(|(_, slot)| slot)
            .chain(slots.collided.take().map(|(_, slot)| slot))
            .chain(slots.unsent.drain(..unsent));
        for slot in failed {
            let _ = slot.send(Err(error()));
        }
    }

    /// Fails every publish still waiting; called when the task ends.
    fn close(&self) {
        self.connected.store(false, Ordering::Release);
        let mut slots = self.slots();
        let slots = &mut *slots;
        let waiting = slots
            .awaiting
            .drain()
            .map(|(_, slot)| slot)
            .chain(slots.collided.take().map(|(_, slot)| slot))
            .chain(slots.unsent.drain(..));
        for slot in waiting {
            let _ = slot.send(Err(SinkError::retryable("the mqtt sink is shut down")));
        }
    }

    /// Tells the task that the coming disconnect is wanted: it ends instead of reconnecting.
    pub(super) fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
    }
}

/// Polls the event loop until the sink stops, reconnecting with backoff after each drop.
pub(super) async fn drive(mut eventloop: EventLoop, session: std::sync::Arc<Session>) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut failures = 0u32;
    loop {
        match eventloop.poll().await {
            Ok(event) => {
                if matches!(event, Event::Incoming(Packet::ConnAck(_))) {
                    backoff.reset();
                    failures = 0;
                }
                session.handle(event);
            }
            Err(_) if session.stopping.load(Ordering::Acquire) => break,
            Err(err) => {
                let was_connected = session.connected.load(Ordering::Acquire);
                session.connection_lost(&mut eventloop, &err);
                let delay = backoff.next_delay();
                failures += 1;
                // One line per outage start, then one per ten attempts.
                if was_connected || failures % 10 == 1 {
                    warn!(broker = %session.broker, error = %ErrorChain(&err), attempts = failures, retry_in_ms = delay.as_millis() as u64, "mqtt connection lost; reconnecting");
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
    session.close();
}

fn puback_outcome(reason: PubAckReason) -> Result<Delivery, SinkError> {
    match reason {
        PubAckReason::Success | PubAckReason::NoMatchingSubscribers => Ok(Delivery::default()),
        other => Err(rejection(format!("{other:?}"), is_permanent_ack(other))),
    }
}

fn pubrec_error(reason: PubRecReason) -> Option<SinkError> {
    let permanent = match reason {
        PubRecReason::Success | PubRecReason::NoMatchingSubscribers => return None,
        PubRecReason::NotAuthorized
        | PubRecReason::TopicNameInvalid
        | PubRecReason::PayloadFormatInvalid => true,
        PubRecReason::UnspecifiedError
        | PubRecReason::ImplementationSpecificError
        | PubRecReason::PacketIdentifierInUse
        | PubRecReason::QuotaExceeded => false,
    };
    Some(rejection(format!("{reason:?}"), permanent))
}

/// Reasons that repeat for the same message whatever the timing: the partition blocks.
fn is_permanent_ack(reason: PubAckReason) -> bool {
    matches!(
        reason,
        PubAckReason::NotAuthorized
            | PubAckReason::TopicNameInvalid
            | PubAckReason::PayloadFormatInvalid
    )
}

fn rejection(reason: String, permanent: bool) -> SinkError {
    let message = format!("the mqtt broker rejected the publish: {reason}");
    if permanent {
        SinkError::permanent(message)
    } else {
        SinkError::retryable(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_reasons_carry_the_retry_decision() {
        assert!(puback_outcome(PubAckReason::Success).is_ok());
        assert!(puback_outcome(PubAckReason::NoMatchingSubscribers).is_ok());
        let denied = puback_outcome(PubAckReason::NotAuthorized).expect_err("denied");
        assert!(!denied.is_retryable());
        assert!(denied.to_string().contains("NotAuthorized"), "{denied}");
        let quota = puback_outcome(PubAckReason::QuotaExceeded).expect_err("quota");
        assert!(quota.is_retryable());
        assert!(pubrec_error(PubRecReason::Success).is_none());
        assert!(
            !pubrec_error(PubRecReason::TopicNameInvalid)
                .expect("error")
                .is_retryable()
        );
    }

    #[test]
    fn slots_pair_in_order_and_collisions_wait_for_their_id() {
        let session = Session::new("test:1883".into());
        let mut receivers = Vec::new();
        for _ in 0..3 {
            let (slot, outcome) = oneshot::channel();
            session.slots().unsent.push_back(slot);
            receivers.push(outcome);
        }
        session.handle(Event::Outgoing(Outgoing::Publish(1)));
        session.handle(Event::Outgoing(Outgoing::AwaitAck(1)));
        session.handle(Event::Outgoing(Outgoing::Publish(2)));
        session.handle(Event::Incoming(Packet::PubAck(
            rumqttc::v5::mqttbytes::v5::PubAck::new(1, None),
        )));
        // The held-back publish goes out under id 1 once id 1 is free.
        session.handle(Event::Outgoing(Outgoing::Publish(1)));
        session.handle(Event::Incoming(Packet::PubAck(
            rumqttc::v5::mqttbytes::v5::PubAck::new(1, None),
        )));
        let mut first = receivers.remove(0);
        let mut second = receivers.remove(0);
        let mut third = receivers.remove(0);
        assert!(first.try_recv().expect("resolved").is_ok());
        assert!(second.try_recv().expect("resolved").is_ok());
        assert!(third.try_recv().is_err(), "id 2 is not acked yet");
        session.close();
        assert!(
            third
                .try_recv()
                .expect("failed at close")
                .expect_err("shut down")
                .is_retryable()
        );
    }
}
