//! The application's own Redis writes, applied by ferry's script in the same atomic step as
//! the outbox entry (or the inbox record).

use std::time::Duration;

use super::scripts::ArgSink;

/// Business writes applied together with ferry's own, all or none: the script checks every
/// write (argument shapes, and that each key holds, or will by then hold, the type the
/// command needs) before it applies any, so a write that would fail leaves nothing behind.
///
/// Keys must not start with the outbox's key prefix. The commands are the ones whose
/// success can be checked in advance; anything else (a counter, a conditional update)
/// belongs in a `WATCH` … `MULTI`/`EXEC` around the enqueue call, see
/// [`RedisOutbox::enqueue_command`](super::RedisOutbox::enqueue_command).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RedisWrites {
    /// Distinct keys in first-use order: the script's KEYS.
    keys: Vec<Vec<u8>>,
    writes: Vec<Write>,
}

#[derive(Debug, Clone, PartialEq)]
struct Write {
    command: &'static str,
    /// 1-based index into `keys`.
    key: usize,
    args: Vec<Vec<u8>>,
}

impl RedisWrites {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// How many writes there are.
    pub fn len(&self) -> usize {
        self.writes.len()
    }

    /// `SET key value`.
    pub fn set(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> &mut Self {
        self.push("SET", key, [value.as_ref()])
    }

    /// `DEL key`.
    pub fn del(&mut self, key: impl AsRef<[u8]>) -> &mut Self {
        self.push("DEL", key, [])
    }

    /// `PEXPIRE key ttl` (at least 1 ms).
    pub fn pexpire(&mut self, key: impl AsRef<[u8]>, ttl: Duration) -> &mut Self {
        let millis = ttl.as_millis().max(1).to_string();
        self.push("PEXPIRE", key, [millis.as_bytes()])
    }

    /// `HSET key field value`.
    pub fn hset(
        &mut self,
        key: impl AsRef<[u8]>,
        field: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> &mut Self {
        self.push("HSET", key, [field.as_ref(), value.as_ref()])
    }

    /// `HDEL key field`.
    pub fn hdel(&mut self, key: impl AsRef<[u8]>, field: impl AsRef<[u8]>) -> &mut Self {
        self.push("HDEL", key, [field.as_ref()])
    }

    /// `SADD key member`.
    pub fn sadd(&mut self, key: impl AsRef<[u8]>, member: impl AsRef<[u8]>) -> &mut Self {
        self.push("SADD", key, [member.as_ref()])
    }

    /// `SREM key member`.
    pub fn srem(&mut self, key: impl AsRef<[u8]>, member: impl AsRef<[u8]>) -> &mut Self {
        self.push("SREM", key, [member.as_ref()])
    }

    /// `ZADD key score member`. A score that is not finite is refused by the script.
    pub fn zadd(
        &mut self,
        key: impl AsRef<[u8]>,
        member: impl AsRef<[u8]>,
        score: f64,
    ) -> &mut Self {
        let score = score.to_string();
        self.push("ZADD", key, [score.as_bytes(), member.as_ref()])
    }

    /// `ZREM key member`.
    pub fn zrem(&mut self, key: impl AsRef<[u8]>, member: impl AsRef<[u8]>) -> &mut Self {
        self.push("ZREM", key, [member.as_ref()])
    }

    /// `RPUSH key value`.
    pub fn rpush(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> &mut Self {
        self.push("RPUSH", key, [value.as_ref()])
    }

    /// `LPUSH key value`.
    pub fn lpush(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> &mut Self {
        self.push("LPUSH", key, [value.as_ref()])
    }

    fn push<const N: usize>(
        &mut self,
        command: &'static str,
        key: impl AsRef<[u8]>,
        args: [&[u8]; N],
    ) -> &mut Self {
        let key = key.as_ref();
        let index = match self.keys.iter().position(|k| k == key) {
            Some(found) => found,
            None => {
                self.keys.push(key.to_vec());
                self.keys.len() - 1
            }
        };
        self.writes.push(Write {
            command,
            key: index + 1,
            args: args.iter().map(|a| a.to_vec()).collect(),
        });
        self
    }

    /// The script's KEYS.
    pub(super) fn keys(&self) -> &[Vec<u8>] {
        &self.keys
    }

    /// Each write as the scripts read it: command, key index, argument count, arguments.
    pub(super) fn write_args(&self, sink: &mut impl ArgSink) {
        for write in &self.writes {
            sink.push(write.command);
            sink.push(write.key);
            sink.push(write.args.len());
            for arg in &write.args {
                sink.push(arg.as_slice());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Collect(Vec<String>);

    impl ArgSink for Collect {
        fn push<T: ::redis::ToRedisArgs>(&mut self, arg: T) {
            for bytes in arg.to_redis_args() {
                self.0.push(String::from_utf8_lossy(&bytes).into_owned());
            }
        }
    }

    #[test]
    fn writes_share_keys_and_encode_in_order() {
        let mut writes = RedisWrites::new();
        writes
            .set("order:1", "paid")
            .hset("order:1:items", "sku", "2")
            .zadd("orders", "order:1", -1.5)
            .pexpire("order:1", Duration::from_micros(10));
        assert_eq!(
            writes.keys(),
            [
                b"order:1".to_vec(),
                b"order:1:items".to_vec(),
                b"orders".to_vec()
            ]
        );
        let mut args = Collect::default();
        writes.write_args(&mut args);
        assert_eq!(
            args.0,
            [
                "SET", "1", "1", "paid", "HSET", "2", "2", "sku", "2", "ZADD", "3", "2", "-1.5",
                "order:1", "PEXPIRE", "1", "1", "1"
            ]
        );
    }
}
