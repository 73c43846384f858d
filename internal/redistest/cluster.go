package redistest

import (
	"context"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// clusterMasters and clusterReplicasPerMaster shape the cluster StartCluster
// builds: the smallest one redis-cli accepts, with a replica per master so
// that tests can fail a master over.
const (
	clusterMasters           = 3
	clusterReplicasPerMaster = 1
)

// Cluster is a Redis Cluster of three masters and three replicas started by
// [StartCluster]. Its methods are safe for concurrent use.
type Cluster struct {
	nodes []*Server
}

// StartCluster starts six cluster-enabled redis-servers, joins them with
// redis-cli --cluster create (three masters, one replica each), waits until
// every node reports cluster_state:ok and every replica's link to its
// master is up, and registers cleanups that kill every node by PID. It
// fails tb if redis-server or redis-cli is missing or the cluster does not
// become healthy within twice the start timeout.
func StartCluster(tb testing.TB, opts ...Option) *Cluster {
	tb.Helper()
	cli := lookPath(tb, "redis-cli")
	cfg := newConfig(opts)
	cfg.busPort = true
	cfg.args = append([]string{
		"--cluster-enabled", "yes",
		"--cluster-config-file", "nodes.conf",
		"--cluster-node-timeout", "5000",
		"--repl-diskless-sync-delay", "0",
	}, cfg.args...)
	c := &Cluster{}
	for range clusterMasters * (1 + clusterReplicasPerMaster) {
		c.nodes = append(c.nodes, start(tb, cfg))
	}
	ctx, cancel := context.WithTimeout(tb.Context(), 2*cfg.startTimeout)
	defer cancel()
	args := append([]string{"--cluster", "create"}, c.Addrs()...)
	args = append(args, "--cluster-replicas", fmt.Sprint(clusterReplicasPerMaster), "--cluster-yes")
	out, err := exec.CommandContext(ctx, cli, args...).CombinedOutput()
	if err != nil {
		tb.Fatalf("redistest: redis-cli %s: %v; its output:\n%s", strings.Join(args, " "), err, out)
	}
	if err := c.waitHealthy(ctx); err != nil {
		tb.Fatalf("redistest: cluster on %v is not healthy after %v: %v", c.Addrs(), 2*cfg.startTimeout, err)
	}
	return c
}

// waitHealthy polls every node until all agree the cluster is ok and every
// replica is linked to its master.
func (c *Cluster) waitHealthy(ctx context.Context) error {
	var last error
	for {
		if last = c.healthy(ctx); last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return last
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func (c *Cluster) healthy(ctx context.Context) error {
	replicas := 0
	for _, n := range c.nodes {
		info, err := n.info(ctx, "CLUSTER", "INFO")
		if err != nil {
			return err
		}
		if !strings.Contains(info, "cluster_state:ok") {
			return fmt.Errorf("node %s: cluster_state is not ok", n.addr)
		}
		if want := fmt.Sprintf("cluster_known_nodes:%d", len(c.nodes)); !strings.Contains(info, want) {
			return fmt.Errorf("node %s: want %s", n.addr, want)
		}
		repl, err := n.info(ctx, "INFO", "replication")
		if err != nil {
			return err
		}
		if strings.Contains(repl, "role:slave") {
			replicas++
			if !strings.Contains(repl, "master_link_status:up") {
				return fmt.Errorf("replica %s: master link is not up", n.addr)
			}
		}
	}
	if want := clusterMasters * clusterReplicasPerMaster; replicas != want {
		return fmt.Errorf("%d replicas, want %d", replicas, want)
	}
	return nil
}

func (s *Server) info(ctx context.Context, args ...any) (string, error) {
	v, err := s.command(ctx, args...)
	if err != nil {
		return "", fmt.Errorf("node %s: %v: %w", s.addr, args, err)
	}
	str, ok := v.(string)
	if !ok {
		return "", fmt.Errorf("node %s: %v returned a %T, want a string", s.addr, args, v)
	}
	return str, nil
}

// Addrs returns the addresses of all six nodes, masters and replicas.
func (c *Cluster) Addrs() []string {
	addrs := make([]string, len(c.nodes))
	for i, n := range c.nodes {
		addrs[i] = n.addr
	}
	return addrs
}

// Nodes returns the six node servers, e.g. to kill or pause one. Which are
// masters is up to redis-cli; ask a node with ROLE.
func (c *Cluster) Nodes() []*Server {
	return append([]*Server(nil), c.nodes...)
}

// NewClient returns a cluster client of all nodes, closed when tb ends. Each
// configure function may change the options before the client is made;
// Addrs is already set.
func (c *Cluster) NewClient(tb testing.TB, configure ...func(*redis.ClusterOptions)) *redis.ClusterClient {
	tb.Helper()
	opts := &redis.ClusterOptions{Addrs: c.Addrs()}
	for _, f := range configure {
		f(opts)
	}
	client := redis.NewClusterClient(opts)
	tb.Cleanup(func() { _ = client.Close() })
	return client
}
