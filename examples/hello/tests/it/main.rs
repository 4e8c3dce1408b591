//! The hello example's tests: plugins in their own crates, found through inventory.

// Each test binary is its own crate: it needs the same line as the binary to link the plugin.
use hello_greeter as _;

mod a_plugin_crate_is_found_through_inventory;
