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
    pub(super) purge: Script,
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
    purge: Script::new(script!("#!lua", "purge.lua")),
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
