// Package layering holds the test that enforces connectlimit's import
// direction: bucket imports nothing of ours, costmap only bucket, the
// interceptor never a concrete store, and only tests reach internal/.
package layering
