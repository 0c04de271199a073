//! ferry's Lua scripts, each `common.lua` followed by its own file. Loaded with SCRIPT LOAD
//! and called with EVALSHA; on NOSCRIPT (after a restart or SCRIPT FLUSH) the script is
//! loaded again and the call repeated. [`ArgSink`] takes a script's arguments for either
//! call.

use std::sync::LazyLock;

use redis::{Cmd, Script, ScriptInvocation, ToRedisArgs};

/// `#!lua` makes Redis refuse a writing script up front when it is out of memory, instead
/// of failing at its first write; `flags=no-writes` lets read-only ones run then too.
macro_rules! script {
    ($shebang:literal, $file:literal) => {
        concat!(
            $shebang,
            "\n",
            include_str!("lua/common.lua"),
            include_str!(concat!("lua/", $file))
        )
    };
}

/// The enqueue script's text, as `ferry migrate` stores it for other languages.
pub(super) const ENQUEUE_SOURCE: &str = script!("#!lua", "enqueue.lua");

/// The inbox script's text.
pub(super) const INBOX_SOURCE: &str = script!("#!lua", "inbox.lua");

/// Every script, compiled into the binary.
#[derive(Debug)]
pub(super) struct Scripts {
    pub(super) enqueue: Script,
    pub(super) inbox: Script,
    pub(super) migrate: Script,
    pub(super) mark: Script,
    pub(super) status: Script,
    pub(super) purge_published: Script,
    pub(super) purge_parked: Script,
    pub(super) purge_inbox: Script,
    pub(super) fetch_held: Script,
    pub(super) park: Script,
    pub(super) skip: Script,
    pub(super) requeue: Script,
    pub(super) parked: Script,
    pub(super) retry: Script,
    pub(super) retained: Script,
    pub(super) heartbeat: Script,
    pub(super) acquire: Script,
    pub(super) renew: Script,
    pub(super) release: Script,
    pub(super) set_blocked: Script,
    pub(super) adopt: Script,
}

pub(super) static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    enqueue: Script::new(ENQUEUE_SOURCE),
    inbox: Script::new(INBOX_SOURCE),
    migrate: Script::new(script!("#!lua", "migrate.lua")),
    mark: Script::new(script!("#!lua", "mark.lua")),
    status: Script::new(script!("#!lua flags=no-writes", "status.lua")),
    purge_published: Script::new(script!("#!lua", "purge_published.lua")),
    purge_parked: Script::new(script!("#!lua", "purge_parked.lua")),
    purge_inbox: Script::new(script!("#!lua", "purge_inbox.lua")),
    fetch_held: Script::new(script!("#!lua flags=no-writes", "fetch_held.lua")),
    park: Script::new(script!("#!lua", "park.lua")),
    skip: Script::new(script!("#!lua", "skip.lua")),
    requeue: Script::new(script!("#!lua", "requeue.lua")),
    parked: Script::new(script!("#!lua flags=no-writes", "parked.lua")),
    retry: Script::new(script!("#!lua", "retry.lua")),
    retained: Script::new(script!("#!lua flags=no-writes", "retained.lua")),
    heartbeat: Script::new(script!("#!lua", "heartbeat.lua")),
    acquire: Script::new(script!("#!lua", "acquire.lua")),
    renew: Script::new(script!("#!lua", "renew.lua")),
    release: Script::new(script!("#!lua", "release.lua")),
    set_blocked: Script::new(script!("#!lua", "set_blocked.lua")),
    adopt: Script::new(script!("#!lua", "adopt.lua")),
});

/// Where script arguments go: a [`ScriptInvocation`] (EVALSHA) or a [`Cmd`] (EVAL).
pub(crate) trait ArgSink {
    fn push<T: ToRedisArgs>(&mut self, arg: T);
}

impl ArgSink for ScriptInvocation<'_> {
    fn push<T: ToRedisArgs>(&mut self, arg: T) {
        self.arg(arg);
    }
}

impl ArgSink for Cmd {
    fn push<T: ToRedisArgs>(&mut self, arg: T) {
        self.arg(arg);
    }
}
