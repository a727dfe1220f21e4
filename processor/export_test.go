package processor

// SetGraceTimer makes the routing streams hand the function that ends an
// unclaimed request to arm instead of running it after ObserverGrace, so
// that a test fires it when it chooses. Call it before the Server serves.
func (s *Server) SetGraceTimer(arm func(f func())) { s.afterGrace = arm }
