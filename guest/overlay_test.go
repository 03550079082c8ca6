package main

import "testing"

func TestOverlayArgsTakeOnlyWhatTheShellInitTakes(t *testing.T) {
	good := map[string][2]string{
		"root=/dev/vda ro":     {"", "50%"},
		"vulcan.overlay=tmpfs": {"tmpfs", "50%"},
		"vulcan.overlay=/dev/vdb vulcan.overlay_size=256m": {"/dev/vdb", "256m"},
		"vulcan.overlay=/dev/vdz vulcan.overlay_size=1024": {"/dev/vdz", "1024"},
		"vulcan.overlay=tmpfs vulcan.overlay_size=25%":     {"tmpfs", "25%"},
	}
	for cmdline, want := range good {
		mode, size, err := overlayArgs(cmdline)
		if err != nil || mode != want[0] || size != want[1] {
			t.Errorf("%q: got %q %q %v, want %q %q", cmdline, mode, size, err, want[0], want[1])
		}
	}
	for _, cmdline := range []string{
		"vulcan.overlay=/dev/sda", "vulcan.overlay=/dev/vda", "vulcan.overlay=/dev/vdb1", "vulcan.overlay=ramfs",
		"vulcan.overlay=tmpfs vulcan.overlay_size=", "vulcan.overlay=tmpfs vulcan.overlay_size=1g,nr_inodes=1",
		"vulcan.overlay=tmpfs vulcan.overlay_size=10mm", "vulcan.overlay=tmpfs vulcan.overlay_size=-1",
	} {
		if _, _, err := overlayArgs(cmdline); err == nil {
			t.Errorf("%q: accepted", cmdline)
		}
	}
}
