// Command vulcan-guest is the agent a Vulcan host talks to inside a microVM.
//
// It listens on AF_VSOCK (default port 52, or vulcan.port=N on the kernel command line; or
// -listen tcp:127.0.0.1:PORT for tests on a normal host) and speaks one JSON object per line:
// see README.md in this directory for the protocol. With vulcan.smoke=1 on the kernel command
// line it instead runs the image's runtime check, prints "vulcan-smoke: ok ..." or
// "vulcan-smoke: fail ..." to the console and stops the VM.
package main

import (
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

const (
	version     = "0.1.0"
	defaultPort = 52
)

var started = time.Now()

type options struct {
	listen    string
	cmdline   string
	configDir string
	poweroff  string
}

func main() {
	var opt options
	flag.StringVar(&opt.listen, "listen", "", "where to listen: vsock:PORT or tcp:HOST:PORT (default: vsock, port from vulcan.port= or 52)")
	flag.StringVar(&opt.cmdline, "cmdline", "/proc/cmdline", "kernel command line to read vulcan.* options from")
	flag.StringVar(&opt.configDir, "config", "/etc/vulcan", "directory with the image's runtime check (check.json)")
	flag.StringVar(&opt.poweroff, "poweroff", "auto", "stop the VM after a smoke check: auto (only when PID 1 or a child of init), true, false")
	flag.StringVar(&clockMode, "set-clock", "auto", "obey the host's clock op: auto (only when PID 1 or a child of init), true, false")
	showVersion := flag.Bool("version", false, "print the version and exit")
	flag.Parse()
	if *showVersion {
		fmt.Println("vulcan-guest", version)
		return
	}
	if os.Getpid() == 1 && filepath.Base(os.Args[0]) == "overlay-init" {
		overlayInit() // never returns: it ends in /sbin/init
	}
	loadImageConfig(opt.configDir)
	if os.Getpid() == 1 && os.Getenv(childEnv) == "" {
		supervise() // never returns
	}
	kargs := readCmdline(opt.cmdline)
	if kargs["vulcan.smoke"] == "1" {
		os.Exit(smoke(opt))
	}
	ln, port, err := listen(opt.listen, kargs)
	if err != nil {
		fmt.Fprintf(os.Stderr, "vulcan-guest: cannot listen: %v\n", err)
		os.Exit(1)
	}
	fmt.Printf("vulcan-guest: ready port=%d\n", port)
	serve(ln, func() (net.Listener, error) {
		again, _, err := listen(opt.listen, kargs)
		return again, err
	})
}

// readCmdline returns the key=value words of the kernel command line.
func readCmdline(path string) map[string]string {
	out := map[string]string{}
	data, err := os.ReadFile(path)
	if err != nil {
		return out
	}
	for _, word := range strings.Fields(string(data)) {
		if k, v, ok := strings.Cut(word, "="); ok {
			out[k] = v
		} else {
			out[word] = ""
		}
	}
	return out
}

func listen(spec string, kargs map[string]string) (net.Listener, int, error) {
	if spec == "" {
		port := defaultPort
		if p, ok := kargs["vulcan.port"]; ok {
			n, err := strconv.Atoi(p)
			if err != nil || n <= 0 || n > 0xFFFFFFFE {
				return nil, 0, fmt.Errorf("bad vulcan.port=%q on the kernel command line", p)
			}
			port = n
		}
		spec = "vsock:" + strconv.Itoa(port)
	}
	kind, addr, _ := strings.Cut(spec, ":")
	switch kind {
	case "vsock":
		port, err := strconv.Atoi(addr)
		if err != nil {
			return nil, 0, fmt.Errorf("bad vsock port %q", addr)
		}
		ln, err := listenVsock(uint32(port))
		if err != nil {
			return nil, 0, err
		}
		return hostOnly{ln}, port, nil
	case "tcp":
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, 0, err
		}
		return ln, ln.Addr().(*net.TCPAddr).Port, nil
	}
	return nil, 0, fmt.Errorf("bad -listen %q: want vsock:PORT or tcp:HOST:PORT", spec)
}
