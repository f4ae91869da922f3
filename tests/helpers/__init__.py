"""What several test modules share (tests import no other test module)."""
