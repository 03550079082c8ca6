package main

import (
	"fmt"
	"os"
	"strings"
	"syscall"
)

// overlayInit is PID 1 on a read-only root for images that may have no shell and no mount
// (templates made from OCI images: /etc/vulcan/overlay-init is a link to the agent). The
// same steps, checks and messages as the shell overlay-init of Alpine images: an overlay with
// the image as its lower layer and a throwaway upper layer (tmpfs, or the scratch drive the
// host made), pivot_root into it, detach the old root, then the image's /sbin/init (the agent).
func overlayInit() {
	fail := func(format string, a ...any) {
		msg := "vulcan-overlay: fail " + fmt.Sprintf(format, a...) + "\n"
		if c, err := os.OpenFile("/dev/console", os.O_WRONLY, 0); err == nil {
			c.WriteString(msg)
			c.Close()
		} else {
			os.Stderr.WriteString(msg)
		}
		os.Exit(1)
	}
	if err := syscall.Mount("proc", "/proc", "proc", syscall.MS_NOSUID|syscall.MS_NODEV|syscall.MS_NOEXEC, ""); err != nil {
		fail("cannot mount /proc")
	}
	cmdline, _ := os.ReadFile("/proc/cmdline")
	syscall.Unmount("/proc", 0)
	mode, size, err := overlayArgs(string(cmdline))
	if err != nil {
		fail("%v", err)
	}
	if mode == "" {
		execInit(fail)
	}
	if mode == "tmpfs" {
		if err := syscall.Mount("vulcan-rw", "/.vulcan/rw", "tmpfs", 0, "size="+size+",mode=0755"); err != nil {
			fail("tmpfs upper layer")
		}
	} else if err := syscall.Mount(mode, "/.vulcan/rw", "ext4", 0, ""); err != nil {
		fail("cannot mount %s as the upper layer", mode)
	}
	os.MkdirAll("/.vulcan/rw/upper", 0o755)
	os.MkdirAll("/.vulcan/rw/work", 0o755)
	if err := syscall.Mount("vulcan-root", "/.vulcan/new", "overlay", 0,
		"lowerdir=/,upperdir=/.vulcan/rw/upper,workdir=/.vulcan/rw/work"); err != nil {
		fail("overlay mount")
	}
	if err := os.Chdir("/.vulcan/new"); err != nil {
		fail("pivot_root")
	}
	if err := syscall.PivotRoot(".", ".vulcan/ro"); err != nil {
		fail("pivot_root")
	}
	os.Chdir("/")
	// The overlay holds its layers itself: detach the old root (and the upper layer's mount under
	// it), so a sandbox sees neither the read-only image nor the upper layer's raw directories.
	if err := syscall.Unmount("/.vulcan/ro", syscall.MNT_DETACH); err != nil {
		fail("cannot detach the read-only root from /.vulcan/ro")
	}
	execInit(fail)
}

func execInit(fail func(string, ...any)) {
	err := syscall.Exec("/sbin/init", []string{"/sbin/init"}, os.Environ())
	fail("cannot start /sbin/init: %v", err)
}

// overlayArgs reads vulcan.overlay= and vulcan.overlay_size= from a kernel command line. Only
// these values are accepted: the command line is the host's, but nothing else from it reaches
// a mount: a drive is /dev/vdb../dev/vdz, a size is digits with an optional k, m, g or %.
func overlayArgs(cmdline string) (mode, size string, err error) {
	size = "50%"
	for _, arg := range strings.Fields(cmdline) {
		if v, ok := strings.CutPrefix(arg, "vulcan.overlay="); ok {
			mode = v
		} else if v, ok := strings.CutPrefix(arg, "vulcan.overlay_size="); ok {
			size = v
		}
	}
	drive := len(mode) == len("/dev/vdb") && strings.HasPrefix(mode, "/dev/vd") && mode[7] >= 'b' && mode[7] <= 'z'
	if mode != "" && mode != "tmpfs" && !drive {
		return "", "", fmt.Errorf("vulcan.overlay=%s: expected tmpfs or a drive /dev/vdb to /dev/vdz", mode)
	}
	digits := strings.TrimRight(size, "kmg%")
	if len(size)-len(digits) > 1 {
		digits = "x"
	}
	if digits == "" || strings.Trim(digits, "0123456789") != "" {
		return "", "", fmt.Errorf("vulcan.overlay_size=%s: expected digits with an optional k, m, g or %%", size)
	}
	return mode, size, nil
}
