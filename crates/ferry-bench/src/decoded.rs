//! What every reader of the bench's output hands the consumer, whichever sink it reads.

use ferry::ReceivedMessage;

/// A message as a consumer decoded it, or why it could not be.
pub(crate) type Decoded = Result<ReceivedMessage, String>;
