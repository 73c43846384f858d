package redisstore

import "testing"

// keySlot returns the hash slot of key as Redis Cluster computes it: from
// the part between the first "{" and the next "}" when that part is not
// empty, and from the whole key otherwise. The store never needs it, since
// it knows each key's tag; tests compare it with the server's CLUSTER
// KEYSLOT.
func keySlot(key string) uint16 {
	for i := range len(key) {
		if key[i] != '{' {
			continue
		}
		for j := i + 1; j < len(key); j++ {
			if key[j] == '}' {
				if j > i+1 {
					return slot(key[i+1 : j])
				}
				return slot(key)
			}
		}
		return slot(key)
	}
	return slot(key)
}

func TestSlot(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		key  string
		want uint16
	}{
		// The check value of CRC16/XMODEM is 0x31c3 (Redis Cluster spec).
		{"123456789", 0x31c3},
		{"", 0},
		{"foo", 12182},
		{"{user1000}.following", 3443},
		{"{user1000}.followers", 3443},
		{"user1000", 3443},
		// An empty tag hashes the whole key.
		{"foo{}{bar}", keySlot("foo{}{bar}")},
		{"{}x", slot("{}x")},
		// Only the first "{" counts, up to the next "}".
		{"foo{{bar}}zap", slot("{bar")},
		{"foo{bar}{zap}", slot("bar")},
		{"cl:{user:alice}:b", slot("user:alice")},
	} {
		if got := keySlot(tc.key); got != tc.want {
			t.Errorf("keySlot(%q) = %d, want %d", tc.key, got, tc.want)
		}
	}
}
